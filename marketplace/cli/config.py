"""Where the CLI finds the server and the API key: the environment first, then the config file."""

import json
import os
from dataclasses import dataclass
from pathlib import Path


class NotLoggedIn(Exception):
    pass


@dataclass(frozen=True)
class Credentials:
    url: str
    key: str


def default_path() -> Path:
    configured = os.environ.get("SHEDSHARE_CONFIG")
    return Path(configured) if configured else Path.home() / ".config" / "shedshare" / "config.json"


def read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise NotLoggedIn(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def load(path: Path | None = None) -> Credentials:
    """SHEDSHARE_URL and SHEDSHARE_API_KEY override what `shedshare login` saved."""
    saved = read(path or default_path())
    url = os.environ.get("SHEDSHARE_URL") or saved.get("url")
    key = os.environ.get("SHEDSHARE_API_KEY") or saved.get("key")
    if not url or not key:
        raise NotLoggedIn("not logged in: run `shedshare login`, or set SHEDSHARE_URL and SHEDSHARE_API_KEY")
    return Credentials(url=url, key=key)


def save(path: Path, credentials: Credentials) -> None:
    """Write the file readable by its owner only: it holds a key that spends the renter's money."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # O_CREAT's mode does not apply to a file that already exists.
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({"url": credentials.url, "key": credentials.key}, file, indent=2)
        file.write("\n")
