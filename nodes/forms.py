import json
from decimal import Decimal

import pycountry
from django import forms
from django_countries import countries
from django_countries.fields import LazyTypedChoiceField

from nodes import availability
from nodes.models import Isolation, RentersAccepted, Unit, WorkloadClass

MICROS = 1_000_000


class UnitRegisterForm(forms.Form):
    name = forms.CharField(max_length=80, help_text="Something you will recognise, e.g. 'Garden shed'.")
    country = LazyTypedChoiceField(choices=countries)
    subdivision = forms.RegexField(
        regex=r"^[A-Z]{2}-[A-Z0-9]{1,3}$",
        required=False,
        max_length=6,
        help_text="Optional ISO 3166-2 code, e.g. DE-BY.",
        error_messages={"invalid": "Use an ISO 3166-2 code such as DE-BY."},
    )

    def clean(self):
        data = super().clean()
        sub, country = data.get("subdivision"), data.get("country")
        if sub and country and not sub.startswith(f"{country}-"):
            self.add_error("subdivision", f"The subdivision must belong to the country ({country}-...).")
        elif sub and pycountry.subdivisions.get(code=sub) is None:
            self.add_error("subdivision", f"{sub} is not an ISO 3166-2 subdivision.")
        return data


class UnitPolicyForm(forms.Form):
    """The owner's side of the match: what the unit sells, to whom, and when."""

    price_per_gpu_hour = forms.DecimalField(
        min_value=0, max_digits=12, decimal_places=6, help_text="What a renter pays per GPU-hour."
    )
    isolation_levels = forms.MultipleChoiceField(
        choices=Isolation.choices, widget=forms.CheckboxSelectMultiple, label="Isolation levels offered"
    )
    workload_classes = forms.MultipleChoiceField(
        choices=WorkloadClass.choices, widget=forms.CheckboxSelectMultiple, label="Workloads accepted"
    )
    renters_accepted = forms.ChoiceField(choices=RentersAccepted.choices, widget=forms.RadioSelect)
    interruptible_price_percent = forms.IntegerField(
        min_value=1,
        max_value=100,
        label="Interruptible price, % of the price",
        help_text="Interruptible jobs pay this share of your price; an on-demand job may stop them to take the GPUs.",
    )
    max_job_hours = forms.DecimalField(
        required=False,
        min_value=Decimal("0.01"),
        max_value=100_000,
        decimal_places=2,
        label="Longest job, in hours",
        help_text="Empty means any length.",
    )
    availability = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="One window per line in the unit's time zone, e.g. 'mon-fri 08:00-20:00' or "
        "'fri-sun 22:00-06:00' (past midnight); empty means always.",
    )

    # Where the model's checks land on this form.
    MODEL_FIELDS = {"price_per_gpu_hour_micros": "price_per_gpu_hour", "max_job_duration_s": "max_job_hours"}

    @classmethod
    def for_unit(cls, unit: Unit, data=None) -> "UnitPolicyForm":
        hours = None if unit.max_job_duration_s is None else Decimal(unit.max_job_duration_s) / 3600
        initial = {
            "price_per_gpu_hour": Decimal(unit.price_per_gpu_hour_micros) / MICROS,
            "isolation_levels": unit.isolation_levels,
            "workload_classes": unit.workload_classes,
            "renters_accepted": unit.renters_accepted,
            "interruptible_price_percent": unit.interruptible_price_percent,
            "max_job_hours": None if hours is None else round(hours, 2),
            "availability": _availability_text(unit.availability),
        }
        form = cls(data, initial=initial)
        form.fields["availability"].help_text = form.fields["availability"].help_text.replace(
            "the unit's time zone", f"the unit's time zone ({unit.time_zone})"
        )
        return form

    def clean_availability(self) -> list[dict]:
        try:
            return availability.parse_text(self.cleaned_data["availability"])
        except ValueError as error:
            raise forms.ValidationError(str(error)) from None

    def policy(self) -> dict:
        """The cleaned values as Unit fields."""
        data = self.cleaned_data
        hours = data["max_job_hours"]
        return {
            "price_per_gpu_hour_micros": int(data["price_per_gpu_hour"] * MICROS),
            "isolation_levels": data["isolation_levels"],
            "workload_classes": data["workload_classes"],
            "renters_accepted": data["renters_accepted"],
            "interruptible_price_percent": data["interruptible_price_percent"],
            "max_job_duration_s": None if hours is None else int(hours * 3600),
            "availability": data["availability"],
        }

    def add_model_errors(self, error) -> None:
        """Show a model ValidationError on the fields it concerns, the rest above the form."""
        if not hasattr(error, "error_dict"):
            self.add_error(None, error)
            return
        for field, messages in error.message_dict.items():
            name = self.MODEL_FIELDS.get(field, field)
            self.add_error(name if name in self.fields else None, messages)


def _availability_text(windows) -> str:
    try:
        return availability.format_text(windows)
    except ValueError:
        # Unreadable stored windows: show them as they are, so saving asks for a fix rather
        # than quietly making the unit always available.
        return json.dumps(windows)
