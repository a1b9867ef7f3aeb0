"""Settings come from the environment and fail loudly on values that cannot be right."""

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from marketplace.kernel.env import env_bool, env_int, env_list
from tests.conftest import child_environ

PROBE = "import marketplace.settings.base as s; print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL)"


def settings_import(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in child_environ().items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL"}}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import marketplace.settings.base as s; print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL)",
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = settings_import(DEBUG="false", SHEDSHARE_DATA_DIR=str(tmp_path))
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_the_embedded_default_is_sqlite_and_a_serverless_broker(tmp_path):
    result = settings_import(DEBUG="true", SHEDSHARE_DATA_DIR=str(tmp_path), CELERY_BROKER_URL="", REDIS_URL="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.sqlite3", "filesystem://"]


def test_database_and_broker_urls_switch_to_postgresql_and_redis(tmp_path):
    result = settings_import(
        SECRET_KEY="x" * 50,
        SHEDSHARE_DATA_DIR=str(tmp_path),
        DATABASE_URL="postgres://shed@db.internal:5432/shedshare",
        REDIS_URL="redis://cache.internal:6379/0",
        CELERY_BROKER_URL="",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["marketplace.kernel.postgres", "redis://cache.internal:6379/0"]


def test_a_development_secret_is_generated_once_and_kept_private(tmp_path):
    first = settings_import(DEBUG="true", SHEDSHARE_DATA_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "dev-secret-key"
    key = key_file.read_text()
    assert settings_import(DEBUG="true", SHEDSHARE_DATA_DIR=str(tmp_path)).returncode == 0
    assert key_file.read_text() == key
    assert key_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("helper", "raw"), [(env_bool, "maybe"), (env_int, "ten")])
def test_malformed_values_are_refused_with_the_variables_name(monkeypatch, helper, raw):
    monkeypatch.setenv("SHEDSHARE_PROBE", raw)
    with pytest.raises(ImproperlyConfigured, match="SHEDSHARE_PROBE"):
        helper("SHEDSHARE_PROBE", 1)


def test_lists_are_comma_separated(monkeypatch):
    monkeypatch.setenv("SHEDSHARE_PROBE", "a.example, b.example,,")
    assert env_list("SHEDSHARE_PROBE", []) == ["a.example", "b.example"]


def test_the_openapi_schema_is_valid_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/api/v1/jobs" in (tmp_path / "schema.yaml").read_text()


def production_probe(expression: str, **env) -> subprocess.CompletedProcess:
    """``expression`` evaluated in a fresh process on the production settings."""
    clean = {k: v for k, v in child_environ().items() if not k.startswith(("SECURE_", "EMAIL_", "REDIS_", "CACHE_"))}
    clean.pop("DEBUG", None)
    env = {"SECRET_KEY": DEPLOY_SECRET, "DJANGO_SETTINGS_MODULE": "marketplace.settings.production", **env}
    code = f"import django; django.setup(); from django.conf import settings as s; print({expression})"
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=False
    )


# Long and random enough for Django's check (security.W009), as a real deployment's would be.
DEPLOY_SECRET = "tR4x-9Kq2_vLm8Zp0Yc7Ws3Nb6Hd1Jf5Ge4Ua2Xo8Ri0Ty9Pq3"


def test_check_deploy_with_the_production_settings_prints_no_warning(tmp_path):
    env = {k: v for k, v in child_environ().items() if not k.startswith(("SECURE_", "EMAIL_", "DEBUG"))}
    env.update(
        DJANGO_SETTINGS_MODULE="marketplace.settings.production",
        SECRET_KEY=DEPLOY_SECRET,
        ALLOWED_HOSTS="shedshare.example",
        SHEDSHARE_DATA_DIR=str(tmp_path),
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues (0 silenced)." in output, output


def test_production_is_https_only_by_default(tmp_path):
    probe = "s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS"
    result = production_probe(probe, SHEDSHARE_DATA_DIR=str(tmp_path))
    assert result.stdout.split() == ["True", "True", "True", "31536000"], result.stderr


def test_plain_http_and_a_tls_proxy_are_explicit_switches(tmp_path):
    probe = "s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, getattr(s, 'SECURE_PROXY_SSL_HEADER', None)"
    assert production_probe(probe, SHEDSHARE_DATA_DIR=str(tmp_path)).stdout.split() == ["True", "True", "None"]

    plain = production_probe(
        probe, SHEDSHARE_DATA_DIR=str(tmp_path), SECURE_SSL_REDIRECT="false", SECURE_COOKIES="false"
    )
    assert plain.stdout.split() == ["False", "False", "None"], plain.stderr

    proxied = production_probe(probe, SHEDSHARE_DATA_DIR=str(tmp_path), SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")
    assert proxied.stdout.strip() == "True True ('HTTP_X_FORWARDED_PROTO', 'https')", proxied.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "django.core.mail.backends.dummy.EmailBackend False"),
        (
            {"EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend"},
            "django.core.mail.backends.dummy.EmailBackend False",
        ),
        ({"EMAIL_HOST": "smtp.example"}, "django.core.mail.backends.smtp.EmailBackend True"),
    ],
)
def test_production_sends_mail_only_through_a_configured_server(tmp_path, env, expected):
    """Never the console: it would print password-reset links into the web log."""
    result = production_probe("s.EMAIL_BACKEND, s.MAIL_CONFIGURED", SHEDSHARE_DATA_DIR=str(tmp_path), **env)
    assert result.stdout.strip() == expected, result.stderr


def test_throttles_count_in_redis_when_it_is_configured(tmp_path):
    probe = "s.CACHES['default']['BACKEND'].rsplit('.', 1)[1]"
    assert production_probe(probe, SHEDSHARE_DATA_DIR=str(tmp_path)).stdout.strip() == "LocMemCache"
    configured = production_probe(probe, SHEDSHARE_DATA_DIR=str(tmp_path), REDIS_URL="redis://cache.internal:6379/0")
    assert configured.stdout.strip() == "RedisCache", configured.stderr
