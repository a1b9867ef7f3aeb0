"""Test settings: the shared base settings with fixed development secrets and a test data folder."""

import os
from pathlib import Path

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-not-for-production-0123456789")
os.environ.setdefault("SECRETS_KEYS", "dGVzdHMtb25seS1zZWNyZXRzLWtleS0zMi1ieXRlcyE=")  # Fernet: 32 bytes, base64
os.environ.setdefault("SHEDSHARE_DATA_DIR", str(Path(__file__).resolve().parents[2] / ".data" / "tests"))

from marketplace.settings.base import *  # noqa: E402, F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not memory, so the end-to-end test's server and worker processes share it; one per
    # run, so two runs on one machine do not trample each other.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-{os.getpid()}.sqlite3")}  # noqa: F405

STATIC_ROOT = DATA_DIR / "static"  # noqa: F405
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# Tests change the database between placements faster than a worker's refresh interval.
PLACEMENT_REFRESH_INTERVAL_S = 0

# Most tests place jobs for renters with empty wallets; the wallet's tests turn the check on.
WALLET_MIN_RUN_S = 0
# Usage is posted as soon as it is recorded, so tests see it at once.
USAGE_POSTING_INTERVAL_S = 0
# The test process is not a connection server: its interpreter keeps its defaults (one test
# turns the tuning on and puts them back).
STREAM_TUNE_PROCESS = False
