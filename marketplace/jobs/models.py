import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from nodes.models import Isolation, Slice, Unit, WorkloadClass


class JobQuerySet(models.QuerySet):
    def visible_to(self, user) -> "JobQuerySet":
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self
        return self.filter(renter=user)


class Job(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued"
        PLACED = "placed"
        STARTING = "starting"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        LOST = "lost"

    ACTIVE_STATES = (State.PLACED, State.STARTING, State.RUNNING)
    FINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.LOST)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    renter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    name = models.CharField(max_length=120, blank=True)
    image = models.CharField(max_length=255)
    command = models.JSONField(help_text="argv list")

    class Rank(models.TextChoices):
        CHEAPEST = "cheapest"
        RELIABLE = "reliable"

    gpu_count = models.PositiveSmallIntegerField(default=1)
    gpu_milli = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        help_text="Smallest share of one GPU a shared or MIG job needs, in thousandths; empty means any slice "
        "of its isolation level (a whole GPU for gpu and node jobs). Below 1000 only for a one-GPU job.",
    )
    gpu_models = models.JSONField(default=list, blank=True, help_text="Empty means any model.")
    min_vram_gb = models.PositiveIntegerField(default=0)
    min_cuda = models.CharField(max_length=10, blank=True, help_text="Lowest CUDA version, e.g. 12.2.")
    max_price_per_gpu_hour_micros = models.BigIntegerField(null=True, blank=True)
    isolation = models.CharField(max_length=10, choices=Isolation.choices, default=Isolation.GPU)
    jurisdictions = models.JSONField(
        default=list, blank=True, help_text="ISO 3166 countries, subdivisions and named sets; empty means anywhere."
    )
    require_verified_location = models.BooleanField(default=False)
    workload_class = models.CharField(max_length=12, choices=WorkloadClass.choices, default=WorkloadClass.BATCH)
    rank = models.CharField(max_length=10, choices=Rank.choices, default=Rank.CHEAPEST)
    max_duration_s = models.PositiveIntegerField(default=3600)
    ports = models.JSONField(default=list, blank=True, help_text='[{"port": 8000, "protocol": "http"}, ...]')
    relay_in_jurisdiction = models.BooleanField(
        default=False, help_text="Its ports are served only by connection servers within its jurisdictions."
    )
    restartable = models.BooleanField(default=False)
    interruptible = models.BooleanField(
        default=False,
        help_text="Run at the unit's interruptible price; an on-demand job may stop it (with notice) to take its "
        "GPUs, and it is queued again. Usage is billed up to the notice.",
    )
    env = models.JSONField(default=dict, blank=True, help_text="Environment variables: name -> value.")
    secrets = models.JSONField(
        default=dict, blank=True, help_text="Environment variables from the renter's secrets: name -> secret name."
    )
    inputs = models.JSONField(
        default=list, blank=True, help_text="Data the agent fetches before the start: url, path, jurisdiction, …"
    )
    outputs = models.JSONField(
        default=list, blank=True, help_text="Files the agent uploads after the exit: path, url, jurisdiction."
    )
    registry_secret = models.CharField(
        max_length=64, blank=True, help_text="The renter's secret holding USERNAME:PASSWORD for the image's registry."
    )
    network_egress = models.BooleanField(default=False, help_text="May the job reach the network?")
    sandboxed = models.BooleanField(default=False, help_text="Run under a sandboxed runtime such as gVisor.")
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Units' refusals are not attempts: a refusing unit is kept away from the job instead
    # (marketplace.jobs.placement.record.units_that_refused), and the job waits for another.
    refusals = models.PositiveIntegerField(default=0)
    exit_code = models.IntegerField(null=True, blank=True)
    failure_reason = models.CharField(max_length=255, blank=True)
    pending_reason = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    placed_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        # By state and age (the placement queue); by age alone (the recent workload packing plans for).
        indexes = [models.Index(fields=["state", "created_at"]), models.Index(fields=["created_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="job_gpu_count_positive"),
            models.CheckConstraint(
                condition=Q(gpu_milli__isnull=True)
                | Q(gpu_milli=1000)
                | Q(gpu_milli__gte=1, gpu_milli__lt=1000, gpu_count=1),
                name="job_gpu_fraction_single",
            ),
        ]

    def __str__(self) -> str:
        return self.name or str(self.id)

    @property
    def is_final(self) -> bool:
        return self.state in self.FINAL_STATES


class Allocation(models.Model):
    """A lease of slices on one unit for one job, with the price locked at placement."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(Job, on_delete=models.PROTECT, related_name="allocations")
    unit = models.ForeignKey(Unit, on_delete=models.PROTECT, related_name="allocations")
    price_per_gpu_hour_micros = models.BigIntegerField()
    gpu_count = models.PositiveSmallIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    release_reason = models.CharField(max_length=40, blank=True)
    interruptible = models.BooleanField(default=False)
    # The server asked the agent to stop the job (its notice) for a reason not the renter's: an
    # on-demand job needed these slices (``preempted_by``) or the unit no longer meets the job's
    # residency rules. Usage after this moment is not billed.
    image_digest = models.CharField(
        max_length=100, blank=True, help_text="The digest of the image the agent started the job from (sha256:…)."
    )
    runs_in = models.CharField(
        max_length=10, blank=True, help_text="What the agent started the job in (protocol.RunsIn); empty: not said."
    )
    preempted_at = models.DateTimeField(null=True, blank=True)
    preempted_by = models.ForeignKey(Job, on_delete=models.SET_NULL, null=True, blank=True, related_name="preemptions")
    stop_reason = models.CharField(
        max_length=40, blank=True, help_text="Why the job was told to stop at preempted_at: 'preempted' or 'residency'."
    )
    # Written once by the claim; see marketplace.jobs.placement.record.PlacementRecord for its keys.
    placement_record = models.JSONField(
        default=dict, blank=True, help_text="Where the job went and which of its rules and the owner's policy held."
    )
    # Set when the allocation's usage samples were rolled up into UsageHour rows (marketplace/jobs/
    # retention.py): from then on its usage is read from those, and its samples are left to go.
    usage_rolled_up_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["job"], condition=Q(released_at__isnull=True), name="allocation_one_active_per_job"
            ),
            # What a usage sample's (allocation, allocation_started_at) refers to (PostgreSQL), so its
            # partition key is always its allocation's start.
            models.UniqueConstraint(fields=["id", "created_at"], name="allocation_id_started"),
        ]
        # The few allocations whose usage is still in raw samples: the roll-up's and the partition
        # drop's look-ups.
        indexes = [
            models.Index(
                fields=["released_at"], condition=Q(usage_rolled_up_at__isnull=True), name="allocation_not_rolled_up"
            )
        ]

    def __str__(self) -> str:
        return f"allocation {self.id} of {self.job_id} on {self.unit}"


class Lease(models.Model):
    """One slice held by one allocation. The partial unique index is the guarantee that no
    slice is ever leased to two jobs at once; placement's checks are only the fast path."""

    allocation = models.ForeignKey(Allocation, on_delete=models.CASCADE, related_name="leases")
    slice = models.ForeignKey(Slice, on_delete=models.PROTECT, related_name="leases")
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["slice"], condition=Q(released_at__isnull=True), name="lease_one_active_per_slice"
            ),
        ]

    def __str__(self) -> str:
        return f"lease of {self.slice_id} by {self.allocation_id}"


class LogChunk(models.Model):
    """A piece of a job's output as its agent shipped it. (allocation, offset) is unique, so a
    chunk sent again after an agent restart is stored once."""

    allocation = models.ForeignKey(Allocation, on_delete=models.CASCADE, related_name="log_chunks")
    offset = models.BigIntegerField(help_text="Byte offset of the chunk in the job's log file.")
    data = models.TextField()
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["allocation", "offset"]
        constraints = [
            models.UniqueConstraint(fields=["allocation", "offset"], name="log_chunk_unique_offset"),
            models.CheckConstraint(condition=Q(offset__gte=0), name="log_chunk_offset_not_negative"),
        ]

    def __str__(self) -> str:
        return f"log {self.allocation_id}@{self.offset}"


class OfferSnapshot(models.Model):
    """What an online unit offers now, as of its ``capacity_version``: the free GPU count and its
    first free GPU's model, VRAM and CUDA version.

    Offer search reads these columns (indexed, so sorting by them is a short index scan) instead
    of counting every unit's free slices per request. Every change that can alter a unit's free
    capacity bumps its capacity version (placement depends on that too), so a row whose version
    differs from the unit's is stale, and search recomputes exactly those before it reads."""

    unit = models.OneToOneField(Unit, on_delete=models.CASCADE, primary_key=True, related_name="offer")
    version = models.BigIntegerField()
    free_gpus = models.PositiveSmallIntegerField()
    gpu_model = models.CharField(max_length=40, blank=True)
    vram_mb = models.PositiveIntegerField(null=True)
    cuda_version = models.CharField(max_length=20, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=[field, "unit"], condition=Q(free_gpus__gt=0), name=f"offer_by_{field[:8]}")
            for field in ("free_gpus", "vram_mb", "gpu_model")
        ]

    def __str__(self) -> str:
        return f"offer of {self.unit_id} at version {self.version}"


class UsageSample(models.Model):
    """GPU time reported by an agent for one allocation; (allocation, seq) is unique, so a
    repeated or replayed sample can never be counted twice.

    On PostgreSQL the table is partitioned by ``allocation_started_at`` (a week a partition, see
    marketplace/jobs/partitions.py): a unique constraint there must hold the partition key, and
    since the key is the allocation's own start (a foreign key to (allocation, created_at) says
    so), unique (allocation, seq, allocation_started_at) is the same guarantee. The model keeps
    the plain constraint, which is what SQLite has."""

    allocation = models.ForeignKey(Allocation, on_delete=models.PROTECT, related_name="usage_samples")
    seq = models.PositiveIntegerField()
    gpu_ms = models.BigIntegerField(help_text="GPU-milliseconds in this sample (GPUs x wall time).")
    recorded_at = models.DateTimeField(help_text="When the agent took the sample.")
    received_at = models.DateTimeField(default=timezone.now)
    allocation_started_at = models.DateTimeField(help_text="The allocation's created_at: the partition key.")

    class Meta:
        ordering = ["allocation", "seq"]
        indexes = [models.Index(fields=["received_at"])]  # the rating sweep: what arrived lately
        constraints = [
            models.UniqueConstraint(fields=["allocation", "seq"], name="usage_sample_unique_seq"),
            models.CheckConstraint(condition=Q(gpu_ms__gte=0), name="usage_sample_not_negative"),
        ]

    def __str__(self) -> str:
        return f"usage {self.allocation_id}#{self.seq}"


class UsageHour(models.Model):
    """An allocation's usage samples of one UTC hour (by ``recorded_at``), rolled up once the
    allocation ended more than USAGE_DISPUTE_WINDOW_DAYS ago and all its usage was rated. The
    sums are exactly those of the samples it replaced; ``billable_gpu_ms`` is what BILLABLE let
    through, fixed for good once the allocation ended."""

    allocation = models.ForeignKey(Allocation, on_delete=models.PROTECT, related_name="usage_hours")
    hour = models.DateTimeField(help_text="The start of the UTC hour the samples were recorded in.")
    samples = models.PositiveIntegerField()
    gpu_ms = models.BigIntegerField()
    billable_gpu_ms = models.BigIntegerField()
    first_seq = models.PositiveIntegerField()
    last_seq = models.PositiveIntegerField()
    first_recorded_at = models.DateTimeField()
    last_recorded_at = models.DateTimeField()

    class Meta:
        ordering = ["allocation", "hour"]
        indexes = [models.Index(fields=["hour"], name="usage_hour_hour")]  # statements: usage within a range
        constraints = [
            models.UniqueConstraint(fields=["allocation", "hour"], name="usage_hour_unique"),
            models.CheckConstraint(
                condition=Q(billable_gpu_ms__gte=0, billable_gpu_ms__lte=F("gpu_ms")), name="usage_hour_billable_within"
            ),
        ]

    def __str__(self) -> str:
        return f"usage {self.allocation_id} {self.hour:%Y-%m-%d %H}h"


class JobTemplate(models.Model):
    """A renter's saved job spec, by name: the fields of a submit (all or some), which a submit
    naming the template starts from and overrides field by field."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="job_templates")
    name = models.CharField(max_length=64)
    spec = models.JSONField(help_text="Submit fields as the renter sent them.")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="job_template_name_unique_per_owner")]

    def __str__(self) -> str:
        return self.name


class ServiceTraffic(models.Model):
    """What a job served through the relay (marketplace/jobs/relay/), per day and port: requests
    (HTTP requests and forwarded connections) and bytes each way, never what they carried."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="traffic")
    day = models.DateField()
    port = models.PositiveIntegerField()
    relayed_in = models.CharField(
        max_length=10, blank=True, help_text="Where the connection server that served it runs (RELAY_LOCATION)."
    )
    requests = models.BigIntegerField(default=0)
    bytes_in = models.BigIntegerField(default=0, help_text="To the job.")
    bytes_out = models.BigIntegerField(default=0, help_text="From the job.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "day", "port", "relayed_in"], name="service_traffic_job_day_port")
        ]

    def __str__(self) -> str:
        return f"{self.job_id} :{self.port} {self.day}"


class EndpointToken(models.Model):
    """A token the renter gives their own users for one job's HTTP ports (the relay's endpoint),
    shown once; stored as a lookup and an HMAC, like API keys. Revoked, it opens nothing."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="endpoint_tokens")
    name = models.CharField(max_length=80)
    lookup = models.CharField(max_length=12, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.job_id})"
