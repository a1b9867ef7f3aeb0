"""The demo soak (``manage.py soak``), briefly: the demo started as a user starts it, under a
steady submit load, stopped with Ctrl-C's signal, and judged by the invariants on its database."""

import json
import subprocess

import pytest

from marketplace.devtools import devstack
from tests.conftest import child_environ
from tests.e2e import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_short_soak_of_the_demo_finds_it_up_clean_and_balanced(tmp_path):
    env = {**child_environ(), "DEBUG": "true", "SHEDSHARE_DATA_DIR": str(tmp_path)}
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)  # the embedded default, as the README's first command runs it
    argv = [devstack.PYTHON, "manage.py", "soak", "--minutes", "0.5", "--rate", "1", "--port", str(free_port())]

    done = subprocess.run(argv, cwd=devstack.REPO, env=env, capture_output=True, text=True, timeout=600)

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert result["ok"] is True
    assert result["answers"] == {"201": 30} and result["acknowledged"] == 30
    assert set(result["final_states"]) <= {"succeeded", "cancelled"}
    assert sum(result["final_states"].values()) == 30
    assert result["demo_exit_code"] == 0 and result["job_processes_left"] == 0
    assert set(result["invariants"].values()) == {0}


def test_the_soak_refuses_to_run_without_debug(tmp_path):
    env = {**child_environ(), "DEBUG": "false", "SHEDSHARE_DATA_DIR": str(tmp_path), "SECRET_KEY": "x" * 50}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([devstack.PYTHON, "manage.py", "soak", "--minutes", "1"], cwd=devstack.REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip

    assert done.returncode != 0
    assert "needs DEBUG=true" in done.stderr
