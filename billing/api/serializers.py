from rest_framework import serializers


class BalanceSerializer(serializers.Serializer):
    currency = serializers.CharField()
    balance = serializers.DecimalField(max_digits=18, decimal_places=6, coerce_to_string=True)
