"""The project package wires the apps and loads nothing by itself."""

import subprocess
import sys

from tests.conftest import child_environ

SERVER_STACK = ("django", "celery", "kombu", "rest_framework", "stripe", "psycopg")


def python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in child_environ().items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


def test_importing_the_project_package_loads_no_server_library():
    loaded = f"sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_STACK})"
    result = python(f"import marketplace, sys; print({loaded})")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_production_settings_keep_cookies_to_tls_when_debug_is_off(tmp_path):
    probe = "import marketplace.settings.production as s; print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE)"
    result = python(probe, DEBUG="false", SECRET_KEY="x" * 50, SHEDSHARE_DATA_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_the_wsgi_and_asgi_entry_points_load_the_celery_app(tmp_path):
    probe = (
        "import marketplace.asgi as a, marketplace.wsgi as w, celery;"
        "print(callable(a.application), callable(w.application), celery.current_app.main)"
    )
    result = python(probe, DEBUG="true", SHEDSHARE_DATA_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "shedshare"]
