"""Test settings: the production settings with a fixed development secret and a test data folder."""

import os
from pathlib import Path

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-not-for-production-0123456789")
os.environ.setdefault("SHEDSHARE_DATA_DIR", str(Path(__file__).resolve().parent.parent / ".data" / "tests"))

from marketplace.settings import *  # noqa: E402, F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
