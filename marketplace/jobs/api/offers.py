"""``GET /api/v1/offers``: search units with free capacity, sorted, in keyset (cursor) pages."""

import base64
import binascii
import json
import math

from django.core.exceptions import ValidationError
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param
from rest_framework.views import APIView

from marketplace.jobs import offers
from marketplace.kernel.api.errors import PROBLEM_CONTENT_TYPE, problem
from marketplace.kernel.money import from_micros
from marketplace.kernel.numbers import NumberError, int_parse
from nodes.selectors import unit_limits

DEFAULT_LIMIT, MAX_LIMIT = 50, 200
MAX_QUERY, MAX_CURSOR = 2000, 512  # characters
PAGING = ("q", "sort", "cursor", "limit", "format")


class OfferSerializer(serializers.Serializer):
    unit_id = serializers.UUIDField(source="id")
    unit = serializers.CharField(source="name")
    country = serializers.CharField()
    subdivision = serializers.CharField()
    location_verified = serializers.BooleanField()
    gpu_model = serializers.CharField()
    vram_gb = serializers.SerializerMethodField()
    free_gpus = serializers.IntegerField()
    isolation_levels = serializers.ListField(child=serializers.CharField())
    price_per_gpu_hour = serializers.SerializerMethodField(help_text="Per GPU-hour, in currency units.")
    reliability = serializers.FloatField(
        help_text="Jobs kept over the last 30 days, 0 to 1: (kept + 1) / (ended + 2), where kept means the unit ran "
        "the job to its own end (not lost to the unit going offline, the agent losing or refusing it). A unit "
        "with no job ended in that window has 0.5."
    )
    cuda = serializers.CharField()
    limits_in_force = serializers.SerializerMethodField(help_text="Backyard limits the agent last reported.")

    def get_vram_gb(self, unit) -> float:
        return round(unit.vram_mb / 1024, 1)

    def get_price_per_gpu_hour(self, unit) -> str:
        return str(from_micros(unit.price_per_gpu_hour_micros))

    def get_limits_in_force(self, unit) -> list[str]:
        return unit_limits(unit).in_force


class OfferPageSerializer(serializers.Serializer):
    results = OfferSerializer(many=True)
    next = serializers.URLField(allow_null=True)


def _invalid(field: str, message: str) -> Response:
    body = problem(400, "invalid-query", message, title="Invalid query", errors={field: [message]})
    return Response(body, status=400, content_type=PROBLEM_CONTENT_TYPE)


def _cursor_decode(text: str, sort: str) -> list:
    foreign = ValueError("The cursor is not one this API gave out.")
    if len(text) > MAX_CURSOR:
        raise foreign
    try:
        position = json.loads(base64.urlsafe_b64decode(text.encode() + b"=="))
    except (ValueError, binascii.Error):
        raise foreign from None
    if not isinstance(position, list) or len(position) != 3 or position[0] != sort:
        raise ValueError("The cursor belongs to another sort order; start again without it.")
    if not _cursor_value_ok(position[1]):
        raise foreign
    return position[1:]


def _cursor_value_ok(value) -> bool:
    """A value a sort column can hold: short text, a flag, or a finite number a column can store."""
    if isinstance(value, str):
        return len(value) <= 255
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value) and abs(value) < 2**62
    return False


def _cursor_encode(sort: str, value, unit_id) -> str:
    if not isinstance(value, (bool, int, float, str)):
        value = str(value)  # a django_countries Country
    return base64.urlsafe_b64encode(json.dumps([sort, value, str(unit_id)]).encode()).decode().rstrip("=")


def _after(expression: str, descending: bool, value, unit_id):
    """Rows after (value, id) in the order (expression, id), both ascending or both descending
    (so one index scan serves it): a keyset, so ties never repeat or skip."""
    beyond = "lt" if descending else "gt"
    return offers.Q(**{f"{expression}__{beyond}": value}) | offers.Q(**{expression: value, f"pk__{beyond}": unit_id})


class OfferSearchView(APIView):
    """Offers: one per online unit with free GPUs."""

    @extend_schema(
        summary="Search offers",
        description="`q` is a query such as `gpu_name in [H100,B200] num_gpus>=2 jurisdiction=EU "
        "price_per_gpu_hour<=2.5`; fields "
        + ", ".join(offers.FIELDS)
        + "; operators "
        + " ".join(offers.OPERATORS)
        + ". The same filters come as plain parameters, `field=value` or "
        "`field__<op>=value` with op one of " + ", ".join(offers.SUFFIXES) + " (lists comma-separated). "
        f"Numbers are bounded: num_gpus 0 to {offers.MAX_GPUS}, gpu_ram 0 to {offers.MAX_GPU_RAM_GB} (GB), "
        f"price_per_gpu_hour 0 to {offers.MAX_PRICE}, reliability 0 to 1. "
        "An invalid query is a 400 whose detail names the token and its position.",
        parameters=[
            OpenApiParameter("q", str, required=False, description="The query."),
            OpenApiParameter(
                "sort",
                str,
                required=False,
                enum=[f"{d}{s}" for s in offers.SORTS for d in ("", "-")],
                description="Sort key, `-` for descending; default price_per_gpu_hour.",
            ),
            OpenApiParameter("cursor", str, required=False, description="From `next`."),
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                required=False,
                description=f"1 to {MAX_LIMIT}.",
            ),
        ],
        responses={200: OfferPageSerializer, 400: OpenApiResponse(description="An invalid query (problem+json).")},
    )
    def get(self, request):
        params = request.query_params
        if len(params.get("q", "")) > MAX_QUERY:
            return _invalid("q", f"The query is longer than {MAX_QUERY} characters.")
        try:
            clauses = offers.parse(params.get("q", ""))
        except offers.QueryError as error:
            return _invalid("q", str(error))
        try:
            clauses += offers.parse_params({k: v for k, v in params.items() if k not in PAGING})
        except offers.QueryError as error:
            return _invalid(error.param, str(error))
        sort = params.get("sort", "price_per_gpu_hour")
        if sort.lstrip("-") not in offers.SORTS:
            return _invalid("sort", f"Sort by one of {', '.join(offers.SORTS)}, with - for descending.")
        try:
            limit = int_parse(params.get("limit", str(DEFAULT_LIMIT)), minimum=1, maximum=MAX_LIMIT)
        except NumberError:
            return _invalid("limit", f"limit is a whole number from 1 to {MAX_LIMIT}.")
        expression, descending = offers.SORTS[sort.lstrip("-")], sort.startswith("-")
        rows = offers.search(clauses).order_by(*(f"{'-' if descending else ''}{key}" for key in (expression, "pk")))
        if "cursor" in params:
            try:
                value, unit_id = _cursor_decode(params["cursor"], sort)
                rows = rows.filter(_after(expression, descending, value, unit_id))
            except (ValueError, TypeError, ValidationError) as error:
                return _invalid("cursor", str(error))
        page = list(rows[: limit + 1])
        following = None
        if len(page) > limit:
            page = page[:limit]
            last = page[-1]
            cursor = _cursor_encode(sort, getattr(last, expression), last.pk)
            following = replace_query_param(request.build_absolute_uri(), "cursor", cursor)
        return Response({"results": OfferSerializer(page, many=True).data, "next": following})
