"""The caller's own statements: usage (renters) and earnings (owners), as JSON or CSV.

JSON carries the whole statement; CSV, for spreadsheets, its grouped lines only.
"""

from datetime import date

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.statements import EARNINGS_GROUPS, MAX_DAYS, USAGE_GROUPS, Period, owner_statement, renter_statement
from marketplace.kernel.api.renderers import CsvRenderer
from marketplace.kernel.money import from_micros


def _date(params, name: str) -> date | None:
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise serializers.ValidationError({name: [f"Not a date in the form YYYY-MM-DD: {raw!r}."]}) from None


def period_from(params) -> Period:
    """The ``from``/``to`` query parameters as a period of UTC days; by default the last 30."""
    first, last = _date(params, "from"), _date(params, "to")
    default = Period.default(today=last)
    period = Period(first=first or default.first, last=last or default.last)
    if period.first > period.last:
        raise serializers.ValidationError({"from": ["Must not be after 'to'."]})
    if (period.last - period.first).days >= MAX_DAYS:
        raise serializers.ValidationError({"from": [f"A statement covers at most {MAX_DAYS} days."]})
    return period


def group_from(params, allowed: tuple[str, ...]) -> str:
    group = params.get("group") or allowed[0]
    if group not in allowed:
        raise serializers.ValidationError({"group": [f"One of: {', '.join(allowed)}."]})
    return group


def _money(micros: int) -> str:
    return str(from_micros(micros))


def _balance(balance: dict) -> dict:
    return {name: _money(micros) for name, micros in balance.items()}


class UsageLineSerializer(serializers.Serializer):
    day = serializers.DateField(required=False, help_text="With group=day: the UTC day.")
    job_id = serializers.UUIDField(required=False, help_text="With group=job.")
    job_name = serializers.CharField(required=False, help_text="With group=job.")
    gpu_seconds = serializers.CharField(help_text="GPU-seconds recorded, to the millisecond.")
    cost = serializers.CharField(help_text="Charged to the wallet, in the currency's major unit.")


class EarningsLineSerializer(serializers.Serializer):
    day = serializers.DateField(required=False, help_text="With group=day: the UTC day.")
    unit_id = serializers.UUIDField(required=False, help_text="With group=unit.")
    unit_name = serializers.CharField(required=False, help_text="With group=unit.")
    earned = serializers.CharField(help_text="Owed to the owner after the platform fee.")


class StatementBalanceSerializer(serializers.Serializer):
    opening = serializers.CharField(help_text="Before the first day.")
    closing = serializers.CharField(help_text="After the last day.")
    current = serializers.CharField(help_text="Now.")


class TopUpLineSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    amount = serializers.CharField()
    payment_intent_id = serializers.CharField()
    credited_at = serializers.DateTimeField()


class PayoutLineSerializer(serializers.Serializer):
    key = serializers.CharField()
    created_at = serializers.DateTimeField()
    amount = serializers.CharField()
    transfer_state = serializers.CharField(help_text="The transfer's outbox row: pending, sent or failed.")
    transfer_id = serializers.CharField(help_text="Stripe's transfer id (tr_…) once sent.")
    reversed = serializers.BooleanField(help_text="Stripe refused the transfer; the amount is owed again.")


class _StatementSerializer(serializers.Serializer):
    currency = serializers.CharField()
    from_ = serializers.DateField()
    to = serializers.DateField()
    group = serializers.CharField()
    balance = StatementBalanceSerializer()

    def get_fields(self):
        fields = super().get_fields()
        fields["from"] = fields.pop("from_")
        return fields


class UsageStatementSerializer(_StatementSerializer):
    lines = UsageLineSerializer(many=True)
    top_ups = TopUpLineSerializer(many=True)


class EarningsStatementSerializer(_StatementSerializer):
    lines = EarningsLineSerializer(many=True)
    payouts = PayoutLineSerializer(many=True)


def _parameters(groups: tuple[str, ...]) -> list[OpenApiParameter]:
    return [
        OpenApiParameter("from", date, description="First UTC day, YYYY-MM-DD; default 29 days before 'to'."),
        OpenApiParameter("to", date, description="Last UTC day, inclusive; default today."),
        OpenApiParameter("group", str, enum=list(groups), description=f"Default {groups[0]}."),
        OpenApiParameter("format", str, enum=["json", "csv"], description="Or Accept: text/csv; CSV is the lines."),
    ]


_ERRORS = {400: OpenApiResponse(description="problem+json: a bad from, to or group, named in errors")}


class _StatementView(APIView):
    renderer_classes = [JSONRenderer, CsvRenderer]
    groups: tuple[str, ...] = ()
    filename = ""

    def statement(self, user, period: Period, group: str) -> dict:
        raise NotImplementedError

    def present(self, statement: dict) -> dict:
        raise NotImplementedError

    def get(self, request):
        period = period_from(request.query_params)
        group = group_from(request.query_params, self.groups)
        body = self.present(self.statement(request.user, period, group))
        body.update(currency=settings.CURRENCY, group=group, **{"from": period.first, "to": period.last})
        if request.accepted_renderer.format == "csv":
            response = Response(body["lines"])
            name = f"{self.filename}-{group}-{period.first}-{period.last}.csv"
            response["Content-Disposition"] = f'attachment; filename="{name}"'
            return response
        return Response(body)


class UsageStatementView(_StatementView):
    groups = USAGE_GROUPS
    filename = "usage"

    def statement(self, user, period, group):
        return renter_statement(user, period, group=group)

    def present(self, statement):
        lines = [
            {
                **{k: v for k, v in line.items() if k not in ("gpu_ms", "cost_micros")},
                "gpu_seconds": f"{line['gpu_ms'] / 1000:.3f}",
                "cost": _money(line["cost_micros"]),
            }
            for line in statement["lines"]
        ]
        top_ups = [
            {
                "id": topup["id"],
                "amount": _money(topup["amount_minor"] * settings.MICROS_PER_MINOR),
                "payment_intent_id": topup["payment_intent_id"],
                "credited_at": topup["credited_at"],
            }
            for topup in statement["top_ups"]
        ]
        return {"lines": lines, "top_ups": top_ups, "balance": _balance(statement["balance"])}

    @extend_schema(
        summary="Your usage statement",
        description="GPU time and cost per UTC day or per job over an inclusive range of days, the "
        "top-ups credited in it and the wallet balance. JSON, or the lines as CSV.",
        parameters=_parameters(USAGE_GROUPS),
        responses={200: UsageStatementSerializer, **_ERRORS},
    )
    def get(self, request):
        return super().get(request)


class EarningsStatementView(_StatementView):
    groups = EARNINGS_GROUPS
    filename = "earnings"

    def statement(self, user, period, group):
        return owner_statement(user, period, group=group)

    def present(self, statement):
        lines = [
            {**{k: v for k, v in line.items() if k != "earned_micros"}, "earned": _money(line["earned_micros"])}
            for line in statement["lines"]
        ]
        payouts = [
            {**{k: v for k, v in payout.items() if k != "amount_micros"}, "amount": _money(payout["amount_micros"])}
            for payout in statement["payouts"]
        ]
        return {"lines": lines, "payouts": payouts, "balance": _balance(statement["balance"])}

    @extend_schema(
        summary="Your earnings statement",
        description="What your units earned per UTC day or per unit over an inclusive range of days, the "
        "payouts made in it with their Stripe transfers, and the payable balance. JSON, or the lines as CSV.",
        parameters=_parameters(EARNINGS_GROUPS),
        responses={200: EarningsStatementSerializer, **_ERRORS},
    )
    def get(self, request):
        return super().get(request)
