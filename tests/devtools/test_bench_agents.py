"""``bench agents`` refuses SQLite: it measures the production stack on PostgreSQL."""

import pytest
from django.core.management import CommandError, call_command
from django.db import connection


def test_the_benchmark_needs_postgresql(db):
    if connection.vendor == "postgresql":
        pytest.skip("refuses SQLite only")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        call_command("bench", "agents", "--units", "1")
