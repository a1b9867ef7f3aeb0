from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.api.serializers import BalanceSerializer, TopUpCreateSerializer, TopUpSerializer
from billing.selectors import wallet_balance_micros
from billing.topups import topup_create, topups_visible_to
from billing.webhooks import WebhookRejected, webhook_receive
from marketplace.kernel.api.errors import problem_response
from marketplace.kernel.money import from_micros


class BalanceView(APIView):
    @extend_schema(responses=BalanceSerializer)
    def get(self, request):
        balance = {"currency": settings.CURRENCY, "balance": from_micros(wallet_balance_micros(request.user))}
        return Response(BalanceSerializer(balance).data)


class TopUpCreateView(APIView):
    write_scopes = ("billing",)

    @extend_schema(
        summary="Top up the wallet",
        description="Makes a Stripe PaymentIntent for the amount; confirm it with Stripe.js and the "
        "client_secret. The wallet is credited when Stripe reports the payment succeeded. 202 while "
        "the PaymentIntent is still on its way (poll the top-up for its client_secret).",
        request=TopUpCreateSerializer,
        responses={
            201: TopUpSerializer,
            202: TopUpSerializer,
            400: OpenApiResponse(description="problem+json: the amount is missing, malformed or out of bounds"),
            503: OpenApiResponse(description="problem+json: Stripe could not be reached"),
        },
    )
    def post(self, request):
        submitted = TopUpCreateSerializer(data=request.data)
        submitted.is_valid(raise_exception=True)
        topup = topup_create(renter=request.user, amount_minor=submitted.amount_minor())
        code = status.HTTP_201_CREATED if topup.client_secret else status.HTTP_202_ACCEPTED
        return Response(TopUpSerializer(topup).data, status=code)


class TopUpDetailView(APIView):
    @extend_schema(responses={200: TopUpSerializer, 404: OpenApiResponse(description="problem+json")})
    def get(self, request, topup_id):
        return Response(TopUpSerializer(get_object_or_404(topups_visible_to(request.user), pk=topup_id)).data)


@csrf_exempt
def stripe_webhook(request: HttpRequest) -> HttpResponse:
    """Stripe's deliveries: 200 once stored (or already stored), 400 when not genuine."""
    if request.method != "POST":
        return problem_response(405, "method-not-allowed", "Only POST is accepted here.")
    try:
        webhook_receive(payload=request.body, signature=request.headers.get("Stripe-Signature", ""))
    except WebhookRejected as error:
        return problem_response(400, "webhook-signature-invalid", str(error))
    return JsonResponse({"received": True})
