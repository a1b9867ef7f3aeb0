from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.api.serializers import BalanceSerializer
from billing.money import from_micros
from billing.selectors import wallet_balance_micros


class BalanceView(APIView):
    @extend_schema(responses=BalanceSerializer)
    def get(self, request):
        balance = {"currency": settings.CURRENCY, "balance": from_micros(wallet_balance_micros(request.user))}
        return Response(BalanceSerializer(balance).data)
