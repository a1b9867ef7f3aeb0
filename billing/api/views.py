from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.money import from_micros
from billing.selectors import wallet_balance_micros


class BalanceView(APIView):
    @extend_schema(
        responses=inline_serializer(
            "Balance", {"currency": serializers.CharField(), "balance": serializers.DecimalField(18, 6)}
        )
    )
    def get(self, request):
        balance = wallet_balance_micros(request.user)
        return Response({"currency": settings.CURRENCY, "balance": str(from_micros(balance))})
