import re

from django.conf import settings
from rest_framework import serializers

from marketplace.accounts import secrets as renter_secrets
from marketplace.jobs import data as jobdata
from marketplace.jobs import job_reads, jurisdictions
from marketplace.jobs.models import Job
from marketplace.jobs.pending import pending_summary
from marketplace.jobs.relay.endpoints import job_services
from marketplace.jobs.selectors import job_usage
from marketplace.kernel.api.serializers import StrictSerializer
from marketplace.kernel.money import from_micros, to_micros
from nodes.agent import imageref, protocol
from nodes.models import Isolation, WorkloadClass

CUDA_RE = re.compile(r"^(?P<major>\d{1,2})(\.(?P<minor>\d{1,2}))?$")
ENV_NAME = re.compile(protocol.JOB_ENV_NAME)


def _env_names_problems(names) -> list[str]:
    problems = []
    for name in names:
        if not ENV_NAME.fullmatch(name):
            problems.append(
                f"{name[:130]!r} is not a variable name: a letter or '_', then letters, digits or '_' (at most 128)."
            )
        elif protocol.job_env_reserved(name):
            problems.append(
                f"{name!r} is set by the shed itself (HOME, CUDA_VISIBLE_DEVICES, SHEDSHARE_*, NVIDIA_*): "
                "choose another name."
            )
    return problems


class EndpointTokenCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=80, help_text="Whom it is for: shown in the list, never the token.")


class EndpointTokenSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    created_at = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField(allow_null=True)


class PortSerializer(StrictSerializer):
    port = serializers.IntegerField(min_value=1, max_value=65535, help_text="What the job listens on, in its container")
    protocol = serializers.ChoiceField(
        choices=protocol.PORT_PROTOCOLS,
        default="http",
        help_text="http: served at the job's URL (see the job's `services`); tcp: reached with `shedshare forward`.",
    )


class JobSubmitSerializer(StrictSerializer):
    name = serializers.CharField(max_length=120, required=False, allow_blank=True)
    image = serializers.CharField(max_length=255)
    command = serializers.ListField(
        child=serializers.CharField(max_length=4096, allow_blank=True, trim_whitespace=False),
        min_length=1,
        max_length=256,
    )
    gpu_count = serializers.IntegerField(min_value=1, max_value=8, default=1)
    gpu_models = serializers.ListField(
        child=serializers.CharField(max_length=40), required=False, max_length=16, default=list
    )
    min_vram_gb = serializers.IntegerField(min_value=0, max_value=4096, default=0)
    max_price_per_gpu_hour = serializers.DecimalField(
        max_digits=12, decimal_places=6, min_value=0, required=False, allow_null=True
    )
    isolation = serializers.ChoiceField(choices=Isolation.choices, default=Isolation.GPU)
    jurisdictions = serializers.ListField(
        child=serializers.CharField(max_length=40),
        required=False,
        max_length=250,
        default=list,
        help_text="ISO 3166-1 countries (DE), ISO 3166-2 subdivisions (DE-BY) and named sets "
        f"({', '.join(sorted(jurisdictions.NAMED_SETS))}); UK means GB and A+B means both. Empty: anywhere.",
    )
    require_verified_location = serializers.BooleanField(
        default=False, help_text="Only units whose declared location is backed by evidence."
    )
    gpu_milli = serializers.IntegerField(
        min_value=1,
        max_value=1000,
        required=False,
        allow_null=True,
        default=None,
        help_text="Smallest share of one GPU a shared or MIG job needs, in thousandths; below 1000 only with "
        "gpu_count 1 and isolation shared or mig. Empty: any slice of the isolation level.",
    )
    min_cuda = serializers.CharField(
        max_length=10, required=False, allow_blank=True, default="", help_text="Lowest CUDA version, e.g. 12.2."
    )
    workload_class = serializers.ChoiceField(choices=WorkloadClass.choices, default=WorkloadClass.BATCH)
    rank = serializers.ChoiceField(choices=Job.Rank.choices, default=Job.Rank.CHEAPEST)
    max_duration_s = serializers.IntegerField(
        min_value=1,
        max_value=settings.JOB_MAX_DURATION_S,
        required=False,
        help_text="The job is stopped after this long. Default: an hour; for a service, the longest allowed.",
    )
    ports = PortSerializer(
        many=True,
        required=False,
        default=list,
        max_length=protocol.MAX_JOB_PORTS,
        help_text="Ports the job listens on: each reachable only by you (and those you give an endpoint token), "
        "through the marketplace and the shed's own outbound connection.",
    )
    relay_in_jurisdiction = serializers.BooleanField(
        default=False,
        help_text="Serve the job's ports only through connection servers within its jurisdictions (needs "
        "jurisdictions): elsewhere its URL answers 421.",
    )
    restartable = serializers.BooleanField(default=False)
    interruptible = serializers.BooleanField(
        default=False,
        help_text="Pay the unit's interruptible price (a share of its price, set by the owner). An on-demand job "
        "may stop it to take its GPUs: the job gets SIGTERM and a grace period, usage is billed up to the "
        "notice, and it is queued again.",
    )
    network_egress = serializers.BooleanField(default=False)
    sandboxed = serializers.BooleanField(default=False)
    env = serializers.DictField(
        child=serializers.CharField(allow_blank=True, trim_whitespace=False),
        required=False,
        default=dict,
        help_text="Environment variables, name -> value, shown in the job's record (use secrets for credentials). "
        f"With secrets, at most {settings.JOB_ENV_MAX_VARIABLES} variables and {settings.JOB_ENV_MAX_BYTES} bytes, "
        f"each value at most {settings.JOB_ENV_MAX_VALUE_BYTES}; HOME, CUDA_VISIBLE_DEVICES, SHEDSHARE_* and NVIDIA_* "
        "are the shed's.",
    )
    secrets = serializers.DictField(
        child=serializers.CharField(max_length=64),
        required=False,
        default=dict,
        help_text="Environment variables from your secrets, name -> secret name (see /api/v1/secrets): the values "
        "go only to the shed running the job, and are scrubbed from its logs.",
    )

    inputs = jobdata.InputSerializer(
        many=True,
        required=False,
        max_length=jobdata.MAX_ITEMS,
        default=list,
        help_text="Data the shed's agent fetches into <scratch>/inputs/<path> before the job starts (its size and "
        "SHA-256 checked when given); the job itself has no network. Each at a jurisdiction the job allows.",
    )
    outputs = jobdata.OutputSerializer(
        many=True,
        required=False,
        max_length=jobdata.MAX_ITEMS,
        default=list,
        help_text="Files under <scratch>/outputs/ the agent uploads (PUT) after the job exits, each at a "
        "jurisdiction the job allows; a missing or failed one fails the job.",
    )
    registry_secret = serializers.CharField(
        max_length=64,
        required=False,
        allow_blank=True,
        default="",
        help_text="One of your secrets holding USERNAME:PASSWORD (or a token as the password) for the image's "
        "registry: the shed uses it for this job's pull only. The shed's registry policy still applies.",
    )
    template = serializers.CharField(
        max_length=64,
        required=False,
        help_text="One of your templates (/api/v1/templates) to start from: its fields, then this submit's, each "
        "replacing the template's whole.",
    )

    def validate_registry_secret(self, value: str) -> str:
        if value and not renter_secrets.NAME.fullmatch(value):
            raise serializers.ValidationError(f"Not a secret's name ({renter_secrets.NAME_RULE}).")
        return value

    def validate_env(self, value: dict) -> dict:
        problems = _env_names_problems(value)
        for name, text in value.items():
            if len(text.encode()) > settings.JOB_ENV_MAX_VALUE_BYTES:
                problems.append(f"The value of {name} is over {settings.JOB_ENV_MAX_VALUE_BYTES} bytes.")
        if problems:
            raise serializers.ValidationError(problems)
        return value

    def validate_secrets(self, value: dict) -> dict:
        problems = _env_names_problems(value)
        for name, secret in value.items():
            if not renter_secrets.NAME.fullmatch(secret):
                problems.append(f"{name}: {secret[:70]!r} is not a secret's name ({renter_secrets.NAME_RULE}).")
        if problems:
            raise serializers.ValidationError(problems)
        return value

    def validate_image(self, value: str) -> str:
        """The image reference as Docker reads it, and not on a registry that is obviously inside
        an owner's machine or network: a fast answer for the renter; each shed's agent checks the
        registry against its owner's policy again before it pulls anything."""
        try:
            ref = imageref.parse(value)
        except imageref.BadReference:
            raise serializers.ValidationError("Not a valid image reference, e.g. ghcr.io/acme/train:1.2.") from None
        if imageref.internal_host(ref.host) and ref.registry not in settings.JOB_IMAGE_PRIVATE_REGISTRIES:
            raise serializers.ValidationError(
                f"The registry {ref.registry} is a loopback, private or local address or name; "
                "sheds pull images only from public registries such as docker.io or ghcr.io."
            )
        return value

    def validate_gpu_models(self, value: list[str]) -> list[str]:
        return sorted({model.strip().upper() for model in value if model.strip()})

    def validate_jurisdictions(self, value: list[str]) -> list[str]:
        try:
            return jurisdictions.normalise(value)
        except ValueError as error:
            raise serializers.ValidationError(str(error)) from None

    def validate_min_cuda(self, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        match = CUDA_RE.match(value)
        if not match:
            raise serializers.ValidationError("Not a CUDA version; use MAJOR.MINOR, e.g. 12.2.")
        return f"{int(match['major'])}.{int(match['minor'] or 0)}"

    def validate(self, data: dict) -> dict:
        fraction = data.get("gpu_milli")
        shareable = (Isolation.SHARED, Isolation.MIG)
        if (
            fraction is not None
            and fraction < 1000
            and (data.get("gpu_count", 1) != 1 or data.get("isolation") not in shareable)
        ):
            raise serializers.ValidationError(
                {"gpu_milli": "A fraction of a GPU needs gpu_count 1 and isolation shared or mig."}
            )
        if data.get("relay_in_jurisdiction") and not data.get("jurisdictions"):
            raise serializers.ValidationError({"relay_in_jurisdiction": ["Name the jurisdictions it is to stay in."]})
        numbers = [entry["port"] for entry in data.get("ports") or []]
        if len(set(numbers)) != len(numbers):
            raise serializers.ValidationError({"ports": ["Each port once."]})
        if "max_duration_s" not in data:
            service = data.get("workload_class") == protocol.SERVICE
            data["max_duration_s"] = settings.JOB_MAX_DURATION_S if service else settings.JOB_DEFAULT_MAX_DURATION_S
        allowed = data.get("jurisdictions") or []
        staged = jobdata.data_problems(allowed, data.get("inputs") or [], data.get("outputs") or [])
        if staged:
            raise serializers.ValidationError(staged)
        env, bound = data.get("env") or {}, data.get("secrets") or {}
        both = sorted(set(env) & set(bound))
        if both:
            raise serializers.ValidationError({"secrets": [f"{both[0]} is set in env as well; name it once."]})
        if len(env) + len(bound) > settings.JOB_ENV_MAX_VARIABLES:
            raise serializers.ValidationError(
                {"env": [f"At most {settings.JOB_ENV_MAX_VARIABLES} variables, env and secrets together."]}
            )
        size = sum(len(name.encode()) + len(text.encode()) for name, text in env.items())
        if size > settings.JOB_ENV_MAX_BYTES:
            detail = f"The variables come to over {settings.JOB_ENV_MAX_BYTES} bytes."
            raise serializers.ValidationError({"env": [detail]})
        return data

    def to_spec(self) -> dict:
        data = dict(self.validated_data)
        data.pop("template", None)
        price = data.pop("max_price_per_gpu_hour", None)
        data["max_price_per_gpu_hour_micros"] = None if price is None else to_micros(price)
        return data


class JobPlacementSerializer(serializers.Serializer):
    unit_id = serializers.UUIDField(source="unit.id")
    country = serializers.CharField(source="unit.country.code")
    subdivision = serializers.CharField(source="unit.subdivision")
    price_per_gpu_hour = serializers.SerializerMethodField()
    gpu_count = serializers.IntegerField()
    image_digest = serializers.CharField(help_text="The image the shed started the job from; empty until it started.")

    def get_price_per_gpu_hour(self, allocation) -> str:
        return str(from_micros(allocation.price_per_gpu_hour_micros))


class JobSerializer(serializers.ModelSerializer):
    max_price_per_gpu_hour = serializers.SerializerMethodField()
    pending_reason = serializers.JSONField(
        help_text='For a queued job, the last placement pass counted over all units: {"units_considered": 412, '
        '"rejected": {"jurisdiction": 301, "price_cap": 77, "vram": 34}}, and "preempting": {"allocations": 1, '
        '"since": …} while interruptible jobs are being stopped to make room for it. Empty once placed.'
    )
    pending_summary = serializers.SerializerMethodField()
    placement = serializers.SerializerMethodField()
    usage = serializers.SerializerMethodField()
    services = serializers.SerializerMethodField(
        help_text="Each declared port: its URL (HTTP, with your API key or an endpoint token), the command that "
        "forwards it to your machine, and the requests served today (counted every few seconds)."
    )

    class Meta:
        model = Job
        fields = [
            "id", "name", "state", "image", "command", "gpu_count", "gpu_models", "min_vram_gb",
            "max_price_per_gpu_hour", "isolation", "jurisdictions", "require_verified_location",
            "gpu_milli", "min_cuda", "workload_class", "rank", "max_duration_s", "restartable",
            "interruptible", "network_egress", "sandboxed", "env", "secrets", "registry_secret", "inputs", "outputs",
            "ports", "relay_in_jurisdiction", "attempts", "exit_code", "failure_reason", "pending_reason",
            "pending_summary", "placement", "usage", "services", "created_at", "placed_at", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    def get_max_price_per_gpu_hour(self, job) -> str | None:
        micros = job.max_price_per_gpu_hour_micros
        return None if micros is None else str(from_micros(micros))

    def get_pending_summary(self, job) -> str | None:
        """The pending reason in words, e.g. "0 of 412 units fit: 301 outside the allowed jurisdictions, …"."""
        if job.state != Job.State.QUEUED or not job.pending_reason:
            return None
        return pending_summary(job.pending_reason)

    def _latest_allocation(self, job):
        allocations = list(job.allocations.all())
        return allocations[0] if allocations else None

    def get_placement(self, job) -> dict | None:
        allocation = self._latest_allocation(job)
        return JobPlacementSerializer(allocation).data if allocation else None

    def get_usage(self, job) -> dict:
        gpu_ms, cost = job_usage(job)
        return {"gpu_seconds": round(gpu_ms / 1000, 3), "cost": str(from_micros(cost))}

    def get_services(self, job) -> list[dict]:
        if not job.ports:
            return []
        request = self.context.get("request")
        base = request.build_absolute_uri("/").rstrip("/") if request else ""
        return job_services(job, base, job_reads.job_traffic_today(job))


class PlacementRecordSerializer(serializers.Serializer):
    """One placement of the job (an allocation's placement record): where it went and which rules allowed it."""

    placed_at = serializers.DateTimeField(source="created_at")
    allocation_id = serializers.UUIDField(source="id", allow_null=True)
    unit_id = serializers.UUIDField(allow_null=True)
    country = serializers.CharField(source="placement_record.country", default="")
    subdivision = serializers.CharField(source="placement_record.subdivision", default="")
    price_per_gpu_hour = serializers.SerializerMethodField()
    policy = serializers.JSONField(
        source="placement_record.policy",
        default=dict,
        help_text="Each rule of the job and the owner's policy that held when it was placed.",
    )
    released_at = serializers.DateTimeField(allow_null=True, help_text="When the placement ended; null while it holds.")
    release_reason = serializers.CharField(
        help_text="Why it ended, e.g. exited, cancelled, preempted, unit_offline, or residency: the unit's location "
        "stopped meeting the job's rules while it ran."
    )
    stop_reason = serializers.CharField(
        help_text="Set when the platform told the job to stop: preempted (for an on-demand job) or residency."
    )

    def get_price_per_gpu_hour(self, allocation) -> str | None:
        return str(from_micros(allocation.price_per_gpu_hour_micros))


class JobEventSerializer(serializers.Serializer):
    """One step of a job's timeline; ``context["job"]`` is the job, to tell the renter from staff."""

    at = serializers.DateTimeField(source="created_at")
    action = serializers.CharField(help_text="Dotted name, e.g. job.submitted, job.placed, allocation.released.")
    actor = serializers.SerializerMethodField(help_text='"renter", "staff", "unit:<id>", "placement", "liveness"…')
    detail = serializers.SerializerMethodField(
        help_text="What the event recorded that is the renter's to see: allocation, unit, country, subdivision, "
        "reason, previous, exit_code, attempts, price_per_gpu_hour and, for job.placed, the policy that held."
    )

    def get_actor(self, event) -> str:
        return job_reads.event_actor(event, self.context["job"])

    def get_detail(self, event) -> dict:
        return job_reads.event_detail(event)


class JobLogQuerySerializer(serializers.Serializer):
    offset = serializers.IntegerField(
        min_value=0, max_value=2**62, default=0, help_text="Byte offset (UTF-8) to read from."
    )
    limit_bytes = serializers.IntegerField(min_value=1, max_value=1_048_576, default=65_536)
    wait = serializers.IntegerField(
        min_value=0, max_value=25, default=0, help_text="Seconds to wait for output past offset or the job's end."
    )


class JobLogSerializer(serializers.Serializer):
    offset = serializers.IntegerField()
    next_offset = serializers.IntegerField(help_text="The offset to ask for next.")
    data = serializers.CharField(trim_whitespace=False)
    complete = serializers.BooleanField(help_text="The job has ended and nothing is stored past next_offset.")


class AllocationUsageSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    unit = serializers.UUIDField(source="unit_id")
    gpu_seconds = serializers.SerializerMethodField()
    cost = serializers.SerializerMethodField()
    price_per_gpu_hour = serializers.SerializerMethodField()
    started = serializers.DateTimeField(source="created_at")
    released = serializers.DateTimeField(source="released_at", allow_null=True)

    def get_gpu_seconds(self, allocation) -> float:
        return round(allocation.usage_gpu_ms / 1000, 3)

    def get_cost(self, allocation) -> str:
        return str(from_micros(-allocation.usage_wallet_micros))

    def get_price_per_gpu_hour(self, allocation) -> str:
        return str(from_micros(allocation.price_per_gpu_hour_micros))


class JobUsageSerializer(serializers.Serializer):
    gpu_seconds = serializers.FloatField()
    cost = serializers.CharField(help_text="Charged so far, a decimal string.")
    currency = serializers.CharField()
    price_per_gpu_hour = serializers.CharField(allow_null=True, help_text="Of the latest allocation; null if none.")
    allocations = AllocationUsageSerializer(many=True, help_text="Oldest first.")


def job_usage_data(allocations: list) -> dict:
    """The usage endpoint's body from ``job_reads.job_allocations_usage``."""
    gpu_ms = sum(a.usage_gpu_ms for a in allocations)
    cost = -sum(a.usage_wallet_micros for a in allocations)
    return {
        "gpu_seconds": round(gpu_ms / 1000, 3),
        "cost": str(from_micros(cost)),
        "currency": settings.CURRENCY,
        "price_per_gpu_hour": str(from_micros(allocations[-1].price_per_gpu_hour_micros)) if allocations else None,
        "allocations": AllocationUsageSerializer(allocations, many=True).data,
    }
