"""`manage.py bootstrap`: the accounts a fresh installation needs to be tried (compose runs it on
every start). Idempotent: what it made once it keeps, and it prints the same logins each time."""

import json
import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django_countries import countries

from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_authenticate, api_key_create
from nodes.models import Unit
from nodes.services import enrolment_token_issue, unit_register

ROLES = {"admin": {"is_staff": True, "is_superuser": True}, "owner": {}, "renter": {}}


class Command(BaseCommand):
    help = (
        "Make (once) an admin, an owner with a unit and a renter with credit and an API key, each "
        "with a random password; print how to log in; write a fresh enrolment token for the unit."
    )

    def add_arguments(self, parser):
        parser.add_argument("--url", default="http://localhost:8000", help="Where users reach the web server.")
        parser.add_argument("--unit", default="Compose shed", help="The owner's unit.")
        parser.add_argument("--country", default="DE", help="Where the unit stands (ISO 3166-1 alpha-2).")
        parser.add_argument("--credit", type=int, default=100, help="The renter's promotional credit, whole units.")
        parser.add_argument("--token-file", type=Path, required=True, help="Where the unit's enrolment token goes.")
        parser.add_argument("--state-file", type=Path, help="The passwords and API key made [DATA_DIR/bootstrap.json].")

    def handle(self, *args, url: str, unit: str, country: str, credit: int, token_file: Path,
               state_file: Path | None, **options):  # fmt: skip
        country = country.upper()
        if country not in countries:
            raise CommandError(f"{country!r} is not an ISO 3166-1 alpha-2 country code.")
        state_file = state_file or settings.DATA_DIR / "bootstrap.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        with transaction.atomic():
            users = {role: self._user(role, state) for role in ROLES}
            wallet_credit_promotional(user=users["renter"], amount_micros=credit * 1_000_000,
                                      key=f"bootstrap-credit:{users['renter'].pk}")  # fmt: skip
            if not (state.get("api_key") and api_key_authenticate(plaintext=state["api_key"])):
                state["api_key"] = api_key_create(user=users["renter"], name="bootstrap")[1]
            found = Unit.objects.filter(owner=users["owner"], name=unit).first()
            token = enrolment_token_issue(unit=found) if found else unit_register(
                owner=users["owner"], name=unit, country=country)[1]  # fmt: skip
            # The passwords and the key are kept where only this installation's user reads them,
            # so that every start prints the same ones; written before the commit, so that no
            # account is made whose password was never kept. The agent's volume gets the token.
            _write_private(state_file, json.dumps(state, indent=2))
            _write_private(token_file, token + "\n")
        self._announce(url.rstrip("/"), state, unit, token_file, state_file, credit)

    def _user(self, role: str, state: dict):
        user, made = get_user_model().objects.get_or_create(username=role, defaults=ROLES[role])
        if made:
            password = secrets.token_urlsafe(12)
            user.set_password(password)
            user.save(update_fields=["password"])
            state.setdefault("passwords", {})[role] = password
        return user

    def _announce(self, url: str, state: dict, unit: str, token_file: Path, state_file: Path, credit: int) -> None:
        known = state.get("passwords", {})
        password = {role: known.get(role, "(made before this state file; unchanged)") for role in ROLES}
        self.stdout.write(
            "\n".join([
                "Shedshare is ready. Log in (passwords as first made, kept in " f"{state_file}):",
                f"  Portal      {url}/portal/   owner / {password['owner']}   (owns the unit {unit!r})",
                f"              {url}/portal/   renter / {password['renter']}   ({credit} of promotional credit)",
                f"  Admin       {url}/admin/    admin / {password['admin']}",
                f"  API docs    {url}/api/docs/",
                f"  Renter API key, for the API and the CLI (the unit's enrolment token is in {token_file}):",
                f"export SHEDSHARE_URL={url} SHEDSHARE_API_KEY={state['api_key']}",
            ])
        )  # fmt: skip


def _write_private(path: Path, text: str) -> None:
    """Atomically, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
