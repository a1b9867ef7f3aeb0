import functools
import json
import uuid
import zoneinfo
from decimal import Decimal

import pycountry
from django import forms
from django.conf import settings
from django_countries import countries
from django_countries.fields import LazyTypedChoiceField

from nodes import availability
from nodes.models import Isolation, RentersAccepted, Slicing, Unit, WorkloadClass

MICROS = 1_000_000
# Policy fields the form edits under the model's own names.
LIMIT_FIELDS = (
    "slicing", "shared_fraction", "time_zone", "quiet_hours_start", "quiet_hours_end", "quiet_hours_max_gpus",
    "quiet_hours_power_cap_w", "power_budget_kw", "thermal_stop_c", "thermal_resume_c",
)  # fmt: skip


@functools.cache
def time_zones() -> list[str]:
    """IANA time zones by name; the list an owner picks from."""
    return sorted(zoneinfo.available_timezones() | {"UTC"})


class UnitLocationForm(forms.Form):
    """Where the unit is, as its owner declares it; evidence then verifies it."""

    country = LazyTypedChoiceField(choices=countries)
    subdivision = forms.RegexField(
        regex=r"^[A-Z]{2}-[A-Z0-9]{1,3}$",
        required=False,
        max_length=6,
        label="Subdivision (optional)",
        help_text="ISO 3166-2 code of the state or region, e.g. DE-BY for Bavaria.",
        error_messages={"invalid": "Use an ISO 3166-2 code such as DE-BY."},
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every country by name, and no country chosen until the owner picks one.
        self.fields["country"].choices = [("", "Choose a country…"), *countries]

    def clean(self):
        data = super().clean()
        sub, country = data.get("subdivision"), data.get("country")
        if sub and country and not sub.startswith(f"{country}-"):
            self.add_error("subdivision", f"The subdivision must belong to the country ({country}-...).")
        elif sub and pycountry.subdivisions.get(code=sub) is None:
            self.add_error("subdivision", f"{sub} is not an ISO 3166-2 subdivision.")
        return data


class UnitRegisterForm(UnitLocationForm):
    name = forms.CharField(max_length=80, help_text="Something you will recognise, e.g. 'Garden shed'.")
    # One per form shown: sending the same form twice (a reload of the token page, a double
    # click) reaches the unit the first sending registered instead of registering another.
    submission = forms.UUIDField(widget=forms.HiddenInput, initial=uuid.uuid4, required=False)

    field_order = ["name", "country", "subdivision"]


class UnitPolicyForm(forms.Form):
    """The owner's side of the match: what the unit sells, to whom, and when."""

    price_per_gpu_hour = forms.DecimalField(
        min_value=0,
        max_digits=12,
        decimal_places=6,
        label="Price per GPU-hour",
        help_text="What a renter pays for one whole GPU for an hour; slices pay their share of it.",
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

    slicing = forms.ChoiceField(
        choices=Slicing.choices,
        widget=forms.RadioSelect,
        help_text="How each GPU is sold. MIG instances are the ones configured on the appliance (nvidia-smi mig); "
        "a GPU without any is sold whole.",
    )
    shared_fraction = forms.IntegerField(
        min_value=2,
        max_value=8,
        label="Renters per shared GPU",
        help_text="With shared slicing: how many renters share one GPU, 2 to 8. Shared slices have no memory "
        "isolation, and renters are told so.",
    )
    time_zone = forms.ChoiceField(
        label="Time zone", help_text="Quiet hours and availability windows are read in this time zone."
    )
    quiet_hours_start = forms.TimeField(
        required=False,
        label="Quiet hours start",
        widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        help_text="Leave start and end empty for no quiet hours.",
    )
    quiet_hours_end = forms.TimeField(
        required=False,
        label="Quiet hours end",
        widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        help_text="May be past midnight, e.g. 22:00 to 07:00.",
    )
    quiet_hours_max_gpus = forms.IntegerField(
        min_value=0,
        max_value=64,
        label="GPUs taking new work during quiet hours",
        help_text="0 means none: running jobs go on, no new ones start.",
    )
    quiet_hours_power_cap_w = forms.IntegerField(
        required=False,
        min_value=50,
        max_value=2000,
        label="Power cap per GPU during quiet hours, in W",
        help_text="Empty means no cap.",
    )
    power_budget_kw = forms.DecimalField(
        required=False,
        min_value=Decimal("0.1"),
        max_value=Decimal("9999.99"),
        max_digits=6,
        decimal_places=2,
        label="Power budget, in kW",
        help_text="The most the whole unit may draw; no new job starts that would pass it. Empty means none.",
    )
    thermal_stop_c = forms.IntegerField(
        min_value=40,
        max_value=100,
        label="Thermal stop threshold, in °C",
        help_text="No new work while the hottest GPU is at or above this.",
    )
    thermal_resume_c = forms.IntegerField(
        min_value=20,
        max_value=99,
        label="Thermal resume threshold, in °C",
        help_text="Work resumes once the hottest GPU is at or below this; it must be below the stop threshold.",
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
            **{name: getattr(unit, name) for name in LIMIT_FIELDS},
        }
        form = cls(data, initial=initial)
        form.fields["availability"].help_text = form.fields["availability"].help_text.replace(
            "the unit's time zone", f"the unit's time zone ({unit.time_zone})"
        )
        return form

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["time_zone"].choices = [("", "Choose a time zone…"), *((zone, zone) for zone in time_zones())]
        self.fields["price_per_gpu_hour"].label = f"Price per GPU-hour, in {settings.CURRENCY.upper()}"

    FIELDSETS = (
        ("Price", ("price_per_gpu_hour", "interruptible_price_percent")),
        ("Slicing", ("slicing", "shared_fraction")),
        ("Who and what", ("isolation_levels", "workload_classes", "renters_accepted", "max_job_hours")),
        ("When", ("time_zone", "availability")),
        ("Quiet hours", ("quiet_hours_start", "quiet_hours_end", "quiet_hours_max_gpus", "quiet_hours_power_cap_w")),
        ("Power and temperature", ("power_budget_kw", "thermal_stop_c", "thermal_resume_c")),
    )

    def fieldsets(self) -> list[tuple[str, list]]:
        """The fields in groups, each shown as a fieldset with a legend."""
        return [(legend, [self[name] for name in names]) for legend, names in self.FIELDSETS]

    def clean(self):
        data = super().clean()
        start, end = data.get("quiet_hours_start"), data.get("quiet_hours_end")
        if "quiet_hours_start" in data and "quiet_hours_end" in data:
            if start is None and end is not None:
                self.add_error("quiet_hours_start", "Give the start too, or leave both empty for no quiet hours.")
            elif end is None and start is not None:
                self.add_error("quiet_hours_end", "Give the end too, or leave both empty for no quiet hours.")
            elif start is not None and start == end:
                self.add_error("quiet_hours_end", "The end must differ from the start.")
        stop, resume = data.get("thermal_stop_c"), data.get("thermal_resume_c")
        if stop is not None and resume is not None and resume >= stop:
            self.add_error("thermal_resume_c", f"The resume threshold must be below the stop threshold ({stop} °C).")
        return data

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
            **{name: data[name] for name in LIMIT_FIELDS},
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
