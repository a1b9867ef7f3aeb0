from decimal import Decimal

from django.conf import settings
from rest_framework import serializers


class BalanceSerializer(serializers.Serializer):
    currency = serializers.CharField()
    balance = serializers.DecimalField(max_digits=18, decimal_places=6, coerce_to_string=True)


class TopUpCreateSerializer(serializers.Serializer):
    amount = serializers.DecimalField(
        max_digits=12, decimal_places=2, help_text='In the currency\'s major unit, e.g. "25.00".'
    )

    def amount_minor(self) -> int:
        minor_per_unit = 1_000_000 // settings.MICROS_PER_MINOR
        return int(self.validated_data["amount"] * minor_per_unit)


class TopUpSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.CharField()
    amount = serializers.SerializerMethodField()
    currency = serializers.CharField()
    client_secret = serializers.CharField(
        help_text="For Stripe.js to confirm the payment; empty while the PaymentIntent is on its way."
    )
    created_at = serializers.DateTimeField()

    def get_amount(self, topup) -> str:
        minor_per_unit = 1_000_000 // settings.MICROS_PER_MINOR
        return str((Decimal(topup.amount_minor) / minor_per_unit).quantize(Decimal("0.01")))
