from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django_countries import countries

from nodes.models import Unit
from nodes.services import enrolment_token_issue, unit_register


class Command(BaseCommand):
    help = "Print a fresh enrolment token for an owner's unit, registering the unit (and owner) if needed."

    def add_arguments(self, parser):
        parser.add_argument("--owner", required=True, help="Owner's username; created if missing.")
        parser.add_argument("--unit", required=True, help="Unit name.")
        parser.add_argument("--country", required=True, help="ISO 3166-1 alpha-2 code of the unit's location.")

    def handle(self, *args, owner: str, unit: str, country: str, **options):
        country = country.upper()
        if country not in countries:
            raise CommandError(f"{country!r} is not an ISO 3166-1 alpha-2 country code.")
        user, _ = get_user_model().objects.get_or_create(username=owner)
        found = Unit.objects.filter(owner=user, name=unit).first()
        if found is None:
            _, token = unit_register(owner=user, name=unit, country=country)
        else:
            token = enrolment_token_issue(unit=found)
        self.stdout.write(token)
