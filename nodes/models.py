import uuid
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone
from django_countries.fields import CountryField

from nodes import availability
from nodes.agent import protocol


class Isolation(models.TextChoices):
    """Isolation levels, weakest to strongest (the protocol's order); see ``Isolation.rank``."""

    SHARED = protocol.Isolation.SHARED, "Shared (time-sliced GPU, no memory isolation)"
    MIG = protocol.Isolation.MIG, "MIG (hardware partition)"
    GPU = protocol.Isolation.GPU, "Whole exclusive GPUs"
    NODE = protocol.Isolation.NODE, "Whole exclusive unit"

    @classmethod
    def rank(cls, level: str) -> int:
        return protocol.isolation_rank(level)


class Slicing(models.TextChoices):
    WHOLE = protocol.SliceKind.WHOLE, "Whole GPUs"
    MIG = protocol.SliceKind.MIG, "MIG instances"
    SHARED = protocol.SliceKind.SHARED, "Shared fractions of a GPU"


def default_isolation_levels() -> list[str]:
    return [Isolation.GPU, Isolation.NODE]


# What a job is for, as the renter declares it; owners choose which classes they accept. Built
# from the protocol's list: members TRAINING, FINE_TUNING, … with labels "Training", "Fine Tuning", …
WorkloadClass = models.TextChoices("WorkloadClass", [(value.upper(), value) for value in protocol.WORKLOAD_CLASSES])


def default_workload_classes() -> list[str]:
    return list(WorkloadClass.values)


class RentersAccepted(models.TextChoices):
    ANY = "any", "Any renter"
    VERIFIED = "verified", "Verified renters only"


def _choice_subset(values, choices: type[models.TextChoices]) -> list[str]:
    """A non-empty list of distinct choice values, in the choices' order; ValueError otherwise."""
    allowed = list(choices.values)
    if not isinstance(values, list) or not values:
        raise ValueError(f"Choose at least one of: {', '.join(allowed)}.")
    unknown = [repr(v) for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"Unknown {', '.join(unknown)}; choose from: {', '.join(allowed)}.")
    return [v for v in allowed if v in values]


class UnitQuerySet(models.QuerySet):
    def visible_to(self, user) -> "UnitQuerySet":
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self
        return self.filter(owner=user)


def interruptible_price(price_micros: int, percent: int) -> int:
    """What an interruptible job pays per GPU-hour for a slice at this price."""
    return price_micros * percent // 100


class Unit(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        ONLINE = "online"
        SUSPECT = "suspect"
        OFFLINE = "offline"
        DRAINING = "draining"
        RETIRED = "retired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="units")
    name = models.CharField(max_length=80)
    country = CountryField()
    subdivision = models.CharField(max_length=6, blank=True, help_text="ISO 3166-2 code, e.g. DE-BY")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    # Owner policy, first cut: one price for every slice and the isolation levels offered.
    price_per_gpu_hour_micros = models.BigIntegerField(
        default=2_000_000, help_text="Owner's price per GPU-hour in micro-units of the currency."
    )
    isolation_levels = models.JSONField(default=default_isolation_levels)
    workload_classes = models.JSONField(default=default_workload_classes)
    renters_accepted = models.CharField(max_length=10, choices=RentersAccepted.choices, default=RentersAccepted.ANY)
    interruptible_price_percent = models.PositiveSmallIntegerField(
        default=50,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="What an interruptible job pays, as a percentage of the price; on-demand jobs may stop it "
        "(with notice) to take its GPUs.",
    )
    max_job_duration_s = models.PositiveIntegerField(
        null=True, blank=True, help_text="Longest job the owner accepts, in seconds; empty means any."
    )
    availability = models.JSONField(
        default=list,
        blank=True,
        help_text='Windows the unit takes jobs in, in its time zone, e.g. [{"days": [0, 1, 2, 3, 4], '
        '"start": "08:00", "end": "20:00"}] (0 is Monday); empty means always. A job is placed only '
        "if its max duration ends inside the window.",
    )
    slicing = models.CharField(max_length=10, choices=Slicing.choices, default=Slicing.WHOLE)
    shared_fraction = models.PositiveSmallIntegerField(
        default=2, help_text="With shared slicing, how many renters share one GPU (2 to 8)."
    )
    # Backyard limits. Quiet hours are read in the unit's own time zone.
    time_zone = models.CharField(max_length=64, default="UTC", help_text="IANA time zone, e.g. Europe/Berlin")
    quiet_hours_start = models.TimeField(null=True, blank=True)
    quiet_hours_end = models.TimeField(null=True, blank=True)
    quiet_hours_max_gpus = models.PositiveSmallIntegerField(
        default=0, help_text="GPUs that may take new work during quiet hours."
    )
    quiet_hours_power_cap_w = models.PositiveIntegerField(
        null=True, blank=True, help_text="Power limit per GPU during quiet hours, in watts."
    )
    power_budget_kw = models.DecimalField(
        max_digits=6, decimal_places=2, null=True, blank=True, help_text="Most the whole unit may draw, in kW."
    )
    thermal_stop_c = models.PositiveSmallIntegerField(default=83, help_text="Take no new work at or above this.")
    thermal_resume_c = models.PositiveSmallIntegerField(default=75, help_text="Take work again at or below this.")
    limits = models.JSONField(default=dict, blank=True, help_text="Limits in force, as the agent last reported.")
    # Location evidence. The declared location is country + subdivision above; it is verified
    # by the country of the agent's public address and/or an operator's attestation, and a
    # mismatch between declared and observed unverifies the unit at once.
    location_verified = models.BooleanField(default=False)
    observed_ip = models.GenericIPAddressField(null=True, blank=True)
    observed_country = models.CharField(max_length=2, blank=True)
    observed_at = models.DateTimeField(null=True, blank=True)
    attested_country = models.CharField(max_length=2, blank=True)
    attested_subdivision = models.CharField(max_length=6, blank=True)
    attested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    attested_at = models.DateTimeField(null=True, blank=True)
    reliability = models.FloatField(
        default=0.5, help_text="Share of recent allocations that ended without the unit losing them (smoothed)."
    )
    # The country the agent's own configuration names, as its heartbeats report it ("" when it
    # names none). A unit whose agent disagrees with the declared country takes no job
    # restricted to jurisdictions until the two agree.
    agent_country = models.CharField(max_length=2, blank=True)
    # Implausible usage reports in the current window (USAGE_REVIEW_WINDOW_S, from the first
    # one); USAGE_REVIEW_AFTER of them put the unit under review: out of placement until staff
    # clear it.
    implausible_reports = models.PositiveIntegerField(default=0)
    implausible_since = models.DateTimeField(null=True, blank=True)
    review_since = models.DateTimeField(null=True, blank=True, help_text="Under review since: no new jobs.")
    review_reason = models.CharField(max_length=255, blank=True)
    # Bumped by every change that can alter what placement may put here (leases, slices,
    # status, policy); placement claims a unit only at the version it decided on.
    capacity_version = models.BigIntegerField(default=0)
    # The owner's drain for maintenance, remembered apart from liveness: a drained unit that
    # misses heartbeats goes suspect and offline like any other, and comes back draining.
    drain_requested = models.BooleanField(default=False)
    capacity_changed_at = models.DateTimeField(auto_now=True, db_index=True)
    credential_lookup = models.CharField(max_length=12, unique=True, null=True, blank=True)
    credential_digest = models.CharField(max_length=64, blank=True)
    enrolled_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The connection server holding the unit's agent stream, and the connection: while that
    # server renews its lease the unit counts as seen (``nodes/streams.py``), with no row written
    # per heartbeat. Cleared when the stream drops.
    stream_server = models.ForeignKey(
        "StreamServer", null=True, blank=True, on_delete=models.SET_NULL, db_constraint=False, related_name="units"
    )
    stream_connection = models.CharField(max_length=40, blank=True)
    agent_version = models.CharField(max_length=40, blank=True)
    hostname = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = UnitQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        # Offer search: online units in price, reliability or name order, read by keyset.
        indexes = [
            models.Index(fields=["status", field, "id"], name=f"unit_offers_by_{field[:5]}")
            for field in ("price_per_gpu_hour_micros", "reliability", "name")
        ]
        constraints = [
            models.CheckConstraint(condition=Q(price_per_gpu_hour_micros__gte=0), name="unit_price_not_negative"),
            models.CheckConstraint(
                condition=Q(thermal_resume_c__lt=F("thermal_stop_c")), name="unit_thermal_hysteresis"
            ),
            models.CheckConstraint(
                condition=Q(shared_fraction__gte=2, shared_fraction__lte=8), name="unit_shared_fraction_range"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        """Check the owner's policy and normalise it in place; the admin and the portal call this."""
        errors = {}
        try:
            self.availability = availability.validate(self.availability)
        except ValueError as error:
            errors["availability"] = str(error)
        for field, choices in (("workload_classes", WorkloadClass), ("isolation_levels", Isolation)):
            try:
                setattr(self, field, _choice_subset(getattr(self, field), choices))
            except ValueError as error:
                errors[field] = str(error)
        if self.renters_accepted not in RentersAccepted.values:
            errors["renters_accepted"] = f"Choose one of: {', '.join(RentersAccepted.values)}."
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            errors["time_zone"] = f"{self.time_zone!r} is not an IANA time zone such as Europe/Berlin."
        if errors:
            raise ValidationError(errors)


class EnrolmentToken(models.Model):
    """A one-time token an owner pastes on the appliance; stored only as a digest."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    unit = models.ForeignKey(Unit, on_delete=models.CASCADE, related_name="enrolment_tokens")
    lookup = models.CharField(max_length=12, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"enrolment token {self.lookup} for {self.unit}"


class GPU(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    unit = models.ForeignKey(Unit, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    device_uuid = models.CharField(max_length=80)
    model = models.CharField(max_length=40, help_text="Normalised model name, e.g. H100")
    vram_mb = models.PositiveIntegerField()
    driver_version = models.CharField(max_length=40, blank=True)
    cuda_version = models.CharField(max_length=20, blank=True)
    mig_mode = models.BooleanField(default=False)
    healthy = models.BooleanField(default=True)
    present = models.BooleanField(default=True, help_text="Reported in the latest inventory.")

    class Meta:
        ordering = ["unit", "index"]
        verbose_name = "GPU"
        # Offer search reads usable GPUs by unit (first free one, how many) and by model.
        indexes = [
            models.Index(fields=fields, condition=Q(present=True, healthy=True), name=name)
            for fields, name in ((["unit", "index"], "gpu_usable_by_unit"), (["model", "unit"], "gpu_usable_by_model"))
        ]
        constraints = [
            models.UniqueConstraint(fields=["unit", "device_uuid"], name="gpu_unique_device"),
        ]

    def __str__(self) -> str:
        return f"{self.unit} GPU{self.index} {self.model}"


class Slice(models.Model):
    """The unit of sale: a whole GPU, a MIG instance or a time-shared fraction of one."""

    Kind = Slicing

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    unit = models.ForeignKey(Unit, on_delete=models.CASCADE, related_name="slices")
    gpu = models.ForeignKey(GPU, on_delete=models.CASCADE, related_name="slices")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.WHOLE)
    device_uuid = models.CharField(max_length=80, help_text="What the job is given: a GPU or MIG instance UUID.")
    share_index = models.PositiveSmallIntegerField(default=0, help_text="Which share of a shared GPU.")
    isolation = models.CharField(max_length=10, choices=Isolation.choices, default=Isolation.GPU)
    vram_mb = models.PositiveIntegerField()
    price_per_gpu_hour_micros = models.BigIntegerField()
    milli = models.PositiveSmallIntegerField(default=1000, help_text="Share of the GPU in thousandths.")
    advertised = models.BooleanField(default=True)

    class Meta:
        ordering = ["unit", "gpu__index"]
        constraints = [
            models.UniqueConstraint(fields=["gpu", "kind", "device_uuid", "share_index"], name="slice_unique_per_gpu"),
        ]

    def __str__(self) -> str:
        return f"{self.gpu} ({self.kind})"


class LivenessClock(models.Model):
    """One row: when the liveness sweep last ran, and when it last came back after a gap (the
    server's own outage: its database, broker or workers away). Silence while the server could
    not have received or judged heartbeats is not held against the units."""

    swept_at = models.DateTimeField()
    resumed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"liveness swept at {self.swept_at:%Y-%m-%d %H:%M:%S}"


class StreamServer(models.Model):
    """A connection server process holding agent streams. It renews ``renewed_at`` every
    STREAM_LEASE_RENEW_S; the units it holds count as seen up to then. A server that died stops
    renewing, and its units go silent from that moment."""

    id = models.CharField(max_length=80, primary_key=True)
    started_at = models.DateTimeField(default=timezone.now)
    renewed_at = models.DateTimeField()
    # host:port where the other servers reach it for the relay to a job whose stream it holds
    relay_address = models.CharField(max_length=100, blank=True)
    location = models.CharField(max_length=10, blank=True, help_text="Where it runs (RELAY_LOCATION).")

    def __str__(self) -> str:
        return f"connection server {self.id}"


class UnitNudge(models.Model):
    """Something an agent must hear at once, committed with what caused it: "look" (work was
    placed, a job cancelled or preempted, the policy or the status changed: read the unit again)
    or "connected" (a newer stream of the unit opened: older ones close). Every connection server
    reads the rows after the last it saw; they are pruned after STREAM_NUDGE_KEEP."""

    class Kind(models.TextChoices):
        LOOK = "look"
        CONNECTED = "connected"

    id = models.BigAutoField(primary_key=True)
    unit_id = models.UUIDField()
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.LOOK)
    connection = models.CharField(max_length=40, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.unit_id}"


class UnitTelemetry(models.Model):
    """A sampled history of a unit's GPU readings, one row per unit per STREAM_TELEMETRY_SAMPLE_S
    (the latest readings are in the cache, ``nodes/streams.py``): kept out of the unit and GPU
    rows, which placement reads and locks."""

    id = models.BigAutoField(primary_key=True)
    unit = models.ForeignKey(Unit, on_delete=models.CASCADE, related_name="telemetry")
    at = models.DateTimeField()
    gpus = models.JSONField(help_text='[{"uuid", "temperature_c", "power_w"}, ...]')

    class Meta:
        indexes = [models.Index(fields=["unit", "at"], name="unit_telemetry_by_time")]

    def __str__(self) -> str:
        return f"{self.unit_id} at {self.at:%Y-%m-%d %H:%M}"
