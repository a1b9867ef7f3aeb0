import re

from django_countries import countries
from rest_framework import serializers

from billing.money import from_micros, to_micros
from marketplace.models import Job
from marketplace.selectors import job_usage
from nodes.models import Isolation

# An OCI reference: [registry/]name[:tag][@digest], lower-case path components.
IMAGE_RE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?"  # registry host or first path component
    r"(/[a-z0-9]+([._-][a-z0-9]+)*)*"  # further path components
    r"(:[\w][\w.-]{0,127})?(@sha256:[a-f0-9]{64})?$"  # tag and digest
)


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a misspelt requirement is never silently ignored."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


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
        child=serializers.CharField(max_length=2), required=False, max_length=250, default=list
    )
    max_duration_s = serializers.IntegerField(min_value=1, max_value=30 * 24 * 3600, default=3600)
    restartable = serializers.BooleanField(default=False)
    network_egress = serializers.BooleanField(default=False)
    sandboxed = serializers.BooleanField(default=False)

    def validate_image(self, value: str) -> str:
        if not IMAGE_RE.match(value):
            raise serializers.ValidationError("Not a valid image reference, e.g. ghcr.io/acme/train:1.2.")
        return value

    def validate_gpu_models(self, value: list[str]) -> list[str]:
        return sorted({model.strip().upper() for model in value if model.strip()})

    def validate_jurisdictions(self, value: list[str]) -> list[str]:
        codes = sorted({code.strip().upper() for code in value})
        unknown = [code for code in codes if code not in countries]
        if unknown:
            raise serializers.ValidationError(f"Unknown ISO 3166-1 country codes: {', '.join(unknown)}.")
        return codes

    def to_spec(self) -> dict:
        data = dict(self.validated_data)
        price = data.pop("max_price_per_gpu_hour", None)
        data["max_price_per_gpu_hour_micros"] = None if price is None else to_micros(price)
        return data


class JobPlacementSerializer(serializers.Serializer):
    unit_id = serializers.UUIDField(source="unit.id")
    country = serializers.CharField(source="unit.country.code")
    price_per_gpu_hour = serializers.SerializerMethodField()
    gpu_count = serializers.IntegerField()

    def get_price_per_gpu_hour(self, allocation) -> str:
        return str(from_micros(allocation.price_per_gpu_hour_micros))


class JobSerializer(serializers.ModelSerializer):
    max_price_per_gpu_hour = serializers.SerializerMethodField()
    placement = serializers.SerializerMethodField()
    usage = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id", "name", "state", "image", "command", "gpu_count", "gpu_models", "min_vram_gb",
            "max_price_per_gpu_hour", "isolation", "jurisdictions", "max_duration_s", "restartable",
            "network_egress", "sandboxed",
            "attempts", "exit_code", "failure_reason", "pending_reason", "placement", "usage",
            "created_at", "placed_at", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    def get_max_price_per_gpu_hour(self, job) -> str | None:
        micros = job.max_price_per_gpu_hour_micros
        return None if micros is None else str(from_micros(micros))

    def _latest_allocation(self, job):
        allocations = list(job.allocations.all())
        return allocations[0] if allocations else None

    def get_placement(self, job) -> dict | None:
        allocation = self._latest_allocation(job)
        return JobPlacementSerializer(allocation).data if allocation else None

    def get_usage(self, job) -> dict:
        gpu_ms, cost = job_usage(job)
        return {"gpu_seconds": round(gpu_ms / 1000, 3), "cost": str(from_micros(cost))}
