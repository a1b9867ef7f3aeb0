"""Helpers for the portal's browser tests: Debian's Chromium driven by Playwright, screenshots
kept as artifacts, and an accessibility check with axe-core in the page.

Chromium is the system's (/usr/bin/chromium, installed by .ci/run), never a downloaded build, so
the tests need no network. Without it the browser tests are skipped, except under CI, where a
missing browser is a failure.
"""

import os
import shutil
from pathlib import Path

import pytest
from django.conf import settings

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots land here; CI keeps the folder as the run's artifacts.
ARTIFACTS = Path(os.environ.get("SHEDSHARE_ARTIFACTS", settings.BASE_DIR / ".data" / "artifacts")) / "portal"
# What axe checks: WCAG 2.1 A and AA, which includes labels, contrast, names and keyboard traps.
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def chromium_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"No Chromium at {CHROMIUM}: .ci/run installs Debian's chromium package.")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def accessibility_violations(page) -> list[str]:
    """axe-core's WCAG A/AA violations on the page as it is now, one readable line each."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, options={"runOnly": {"type": "tag", "values": AXE_TAGS}})
    return [
        f"{violation['id']} ({violation['impact']}): {violation['help']} at "
        + ", ".join(" ".join(node["target"]) for node in violation["nodes"][:5])
        for violation in results.response["violations"]
    ]


def assert_accessible(page) -> None:
    violations = accessibility_violations(page)
    assert not violations, f"{page.url}:\n" + "\n".join(violations)
