"""The renter CLI and the node agent load without the server: no Django, DRF, Celery, Stripe
or psycopg in the process (their own distributions do not even install them)."""

import subprocess
import sys

import pytest

SERVER_STACK = ("django", "rest_framework", "drf_spectacular", "celery", "kombu", "stripe", "psycopg")


MODULES = ["marketplace.cli", "marketplace.cli.commands", "nodes.agent.cli", "nodes.agent.loop"]


@pytest.mark.parametrize("module", MODULES)
def test_importing_it_loads_no_server_library(module):
    probe = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({SERVER_STACK})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
