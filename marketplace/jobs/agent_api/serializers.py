from rest_framework import serializers

from marketplace.kernel.api.serializers import StrictSerializer
from nodes.agent.protocol import LIMIT_NAME_PATTERN, Finish, LimitName, RunsIn, SliceKind, Staging


class EnrolSerializer(StrictSerializer):
    token = serializers.CharField(max_length=200)
    hostname = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    agent_version = serializers.CharField(max_length=40, required=False, allow_blank=True, default="")


class EnrolResultSerializer(serializers.Serializer):
    unit_id = serializers.UUIDField()
    credential = serializers.CharField()
    heartbeat_interval_s = serializers.IntegerField()


OPTIONAL = {"required": False, "allow_null": True, "default": None}


class MigReportSerializer(serializers.Serializer):
    uuid = serializers.CharField(max_length=80)
    profile = serializers.CharField(max_length=20)
    memory_mb = serializers.IntegerField(min_value=1, max_value=10_000_000)


class GpuReportSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0, max_value=63)
    uuid = serializers.CharField(max_length=80)
    model = serializers.CharField(max_length=40)
    vram_mb = serializers.IntegerField(min_value=1, max_value=10_000_000)
    driver_version = serializers.CharField(max_length=40, required=False, allow_blank=True, default="")
    cuda_version = serializers.CharField(max_length=20, required=False, allow_blank=True, default="")
    mig_mode = serializers.BooleanField(required=False, default=False)
    healthy = serializers.BooleanField(required=False, default=True)
    temperature_c = serializers.IntegerField(min_value=-50, max_value=200, **OPTIONAL)
    power_w = serializers.FloatField(min_value=0, max_value=100_000, **OPTIONAL)  # NVML reads milliwatts
    mig_instances = MigReportSerializer(many=True, required=False, default=list, max_length=7)


class LimitsSerializer(StrictSerializer):
    """``protocol.LimitsReport``: the only shape of limits stored, shown to owners and in offers."""

    in_force = serializers.ListField(
        child=serializers.RegexField(LIMIT_NAME_PATTERN, max_length=32),
        required=False,
        max_length=8,
        help_text=f"Limits in force: {LimitName.THERMAL}, {LimitName.QUIET_HOURS}, {LimitName.POWER_BUDGET}.",
    )
    advertised_gpus = serializers.IntegerField(min_value=0, max_value=64, required=False)
    gpus = serializers.IntegerField(min_value=0, max_value=64, required=False)

    def validate(self, attrs):
        if attrs.get("advertised_gpus", 0) > attrs.get("gpus", 64):
            raise serializers.ValidationError({"advertised_gpus": ["More GPUs offered than the unit has."]})
        return attrs


class HeartbeatSerializer(serializers.Serializer):
    gpus = GpuReportSerializer(many=True, max_length=64)
    running = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=64)
    agent_version = serializers.CharField(max_length=40, required=False, allow_blank=True, default="")
    advertise = serializers.ListField(
        child=serializers.CharField(max_length=80),
        required=False,
        allow_null=True,
        default=None,
        max_length=64,
        help_text="GPU uuids the agent takes new work on now; omitted or null means every healthy GPU.",
    )
    limits = LimitsSerializer(required=False, allow_null=True, default=None, help_text="Backyard limits in force.")
    country = serializers.RegexField(
        r"^[A-Z]{2}\Z",
        required=False,
        allow_null=True,
        default=None,
        help_text="The ISO 3166-1 country the agent is configured for; omitted or null means none. A unit whose "
        "agent names another country than the unit declares gets no job restricted to jurisdictions.",
    )

    def validate_gpus(self, value):
        uuids = [gpu["uuid"] for gpu in value]
        if len(set(uuids)) != len(uuids):
            raise serializers.ValidationError("GPU uuids must be unique.")
        return value


class QuietHoursSerializer(serializers.Serializer):
    start = serializers.CharField()
    end = serializers.CharField()
    time_zone = serializers.CharField()
    max_gpus = serializers.IntegerField()
    power_cap_w = serializers.IntegerField(allow_null=True)


class PolicySerializer(serializers.Serializer):
    slicing = serializers.CharField()
    shared_fraction = serializers.IntegerField()
    isolation_levels = serializers.ListField(child=serializers.CharField())
    quiet_hours = QuietHoursSerializer(allow_null=True)
    power_budget_w = serializers.IntegerField(allow_null=True)
    thermal_stop_c = serializers.IntegerField()
    thermal_resume_c = serializers.IntegerField()


class HeartbeatResultSerializer(serializers.Serializer):
    status = serializers.CharField()
    heartbeat_interval_s = serializers.IntegerField()
    cancel = serializers.ListField(child=serializers.UUIDField())
    preempt = serializers.ListField(
        child=serializers.UUIDField(),
        help_text="Interruptible jobs to stop for an on-demand job: SIGTERM now (the job's notice), then kill "
        "after the grace period; report them finished with reason 'preempted'.",
    )
    policy = PolicySerializer()


class AssignmentJobSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    image = serializers.CharField()
    command = serializers.ListField(child=serializers.CharField())
    gpu_count = serializers.IntegerField()
    max_duration_s = serializers.IntegerField()
    isolation = serializers.CharField()
    allowed_countries = serializers.ListField(child=serializers.CharField())
    network_egress = serializers.BooleanField()
    sandboxed = serializers.BooleanField()
    interruptible = serializers.BooleanField(
        help_text="Placement may stop it for an on-demand job: its GPUs stay advertised while it runs."
    )
    registry_auth = serializers.BooleanField(
        help_text="The job names a registry credential: ask for it with the secrets (its `registry`)."
    )
    env = serializers.DictField(child=serializers.CharField(), help_text="The job's environment variables.")
    inputs = serializers.ListField(
        child=serializers.DictField(), help_text="Fetch each url into <scratch>/inputs/<path> before the start."
    )
    outputs = serializers.ListField(
        child=serializers.DictField(), help_text="PUT each <scratch>/outputs/<path> to its url after the exit."
    )
    ports = serializers.ListField(
        child=serializers.DictField(),
        help_text="What the job listens on ({port, protocol}): relay channels (protocol.Relay) reach these only.",
    )
    secrets = serializers.ListField(
        child=serializers.CharField(),
        help_text="Variables whose values are the renter's secrets: POST allocations/{id}/secrets for them before "
        "the start, keep them in memory only, and scrub them from the log.",
    )


class RegistryCredentialSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField()


class SecretsSerializer(serializers.Serializer):
    env = serializers.DictField(child=serializers.CharField(), help_text="Variable name -> the secret's value.")
    registry = RegistryCredentialSerializer(
        required=False, help_text="Only when the job names a registry secret: for its image's pull, and that only."
    )


class StagedFileSerializer(StrictSerializer):
    path = serializers.CharField(max_length=255)
    size = serializers.IntegerField(min_value=0, max_value=2**50)
    sha256 = serializers.RegexField(r"^[0-9a-f]{64}$")


class StagingSerializer(StrictSerializer):
    """What the agent did with the job's data: one report per phase, whole."""

    phase = serializers.ChoiceField(choices=["in", "out"])
    ok = serializers.BooleanField()
    reason = serializers.ChoiceField(
        choices=["", *Staging.REASONS], required=False, default="", help_text="Why it failed (when not ok)."
    )
    detail = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    files = StagedFileSerializer(many=True, max_length=64, help_text="What was staged: each path, size, SHA-256.")
    seconds = serializers.FloatField(min_value=0, max_value=7 * 24 * 3600)

    def validate(self, data: dict) -> dict:
        if data["ok"] == bool(data["reason"]):
            raise serializers.ValidationError({"reason": ["A failed staging gives a reason; a good one gives none."]})
        return data


class StartSerializer(StrictSerializer):
    image_digest = serializers.RegexField(
        r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-f]{32,128}$",
        required=False,
        allow_blank=True,
        default="",
        help_text="The digest of the image the job runs from (sha256:…); empty or left out without one.",
    )
    runs_in = serializers.ChoiceField(
        choices=RunsIn.ALL,
        required=False,
        default="",
        help_text="What the agent started the job in: a container, a sandboxed container, or (development) a process.",
    )


class AssignmentGpuSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    uuid = serializers.CharField(help_text="The device to give the job: a GPU or MIG instance UUID.")
    gpu_uuid = serializers.CharField(help_text="The physical GPU it belongs to.")
    kind = serializers.CharField(help_text=f"{SliceKind.WHOLE}, {SliceKind.MIG} or {SliceKind.SHARED}")
    share = serializers.IntegerField(help_text="Which share of a shared GPU.")


class AssignmentSerializer(serializers.Serializer):
    allocation_id = serializers.UUIDField()
    job = AssignmentJobSerializer()
    gpus = AssignmentGpuSerializer(many=True)
    price_per_gpu_hour_micros = serializers.IntegerField()


class UsageSampleSerializer(serializers.Serializer):
    seq = serializers.IntegerField(min_value=1, max_value=2**31 - 1)
    gpu_ms = serializers.IntegerField(min_value=0, max_value=64 * 3_600_000)
    recorded_at = serializers.DateTimeField()


class UsageSerializer(StrictSerializer):
    """A batch of samples, taken or refused whole: see marketplace/jobs/usage.py for the rules."""

    samples = UsageSampleSerializer(many=True, min_length=1, max_length=1000)


class UsageResultSerializer(serializers.Serializer):
    accepted = serializers.IntegerField()
    duplicates = serializers.IntegerField()


class LogChunkSerializer(StrictSerializer):
    offset = serializers.IntegerField(min_value=0, max_value=2**62, help_text="Byte offset in the job's log.")
    # DRF's CharField already refuses NUL and lone surrogates, which PostgreSQL cannot store.
    data = serializers.CharField(max_length=64 * 1024, allow_blank=True, trim_whitespace=False)


class LogChunkResultSerializer(serializers.Serializer):
    accepted = serializers.BooleanField(help_text="False for a chunk already stored, or past the cap.")
    truncated = serializers.BooleanField(help_text="The cap is reached: stop sending this allocation's logs.")


class FinishSerializer(StrictSerializer):
    exit_code = serializers.IntegerField(allow_null=True, min_value=-255, max_value=255)
    reason = serializers.CharField(max_length=40, required=False, allow_blank=True, default=Finish.EXITED)


class JobStateSerializer(serializers.Serializer):
    state = serializers.CharField()
