"""The Content-Security-Policy allows scripts and styles from our own static files only, so no
template of ours may carry an inline script, style or event handler (they would not run)."""

import re
from pathlib import Path

import pytest
from django.test import Client

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted(
    path for folder in ("marketplace", "nodes", "billing") for path in (REPO / folder).rglob("templates/**/*.html")
)
INLINE = [
    (re.compile(r"<style\b", re.I), "an inline <style>"),
    (re.compile(r"\sstyle\s*=", re.I), "a style attribute"),
    (re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>", re.I), "an inline <script>"),
    (re.compile(r"\son[a-z]+\s*=", re.I), "an inline event handler"),
    (re.compile(r"\shx-on", re.I), "an htmx inline handler (hx-on)"),
    (re.compile(r"=\s*[\"']?\s*javascript:", re.I), "a javascript: URL"),
]


def test_there_are_templates_to_check():
    assert len(TEMPLATES) > 20


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_template_has_inline_script_or_style(template):
    text = re.sub(r"\{#.*?#\}", "", template.read_text(), flags=re.S)  # template comments are not sent
    found = [what for pattern, what in INLINE if pattern.search(text)]
    assert not found, f"{template.relative_to(REPO)} has {', '.join(found)}: move it to a static file"


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/accounts/login/", "/api/docs/"])
def test_pages_carry_the_policy(path):
    response = Client().get(path)

    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy


@pytest.mark.django_db
def test_the_api_docs_load_their_start_up_script_as_a_file():
    page = Client().get("/api/docs/").content.decode()
    scripts = re.findall(r"<script\b[^>]*>", page)

    assert scripts and all("src=" in tag for tag in scripts)
