"""Settings come from the environment and fail loudly on values that cannot be right."""

import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from marketplace.kernel.env import env_bool, env_int, env_list

PROBE = "import marketplace.settings.base as s; print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL)"


def settings_import(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL"}}
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
    assert result.stdout.split() == ["django.db.backends.postgresql", "redis://cache.internal:6379/0"]


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
