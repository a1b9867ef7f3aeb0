import logging

import stripe
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse

from billing.models import BillingProfile
from billing.payouts import connect_onboarding_link
from billing.selectors import owner_earnings, owner_payable_micros
from billing.stripe_api import PaymentsUnavailable

log = logging.getLogger(__name__)


@login_required
def earnings(request):
    context = {
        "payable_micros": owner_payable_micros(request.user),
        "entries": owner_earnings(request.user),
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "billing/earnings.html", context)


@login_required
def payouts_connect(request):
    """Send the owner to Stripe's onboarding for their own Connect account; Stripe sends them
    back to ``payouts_return``, or here again (``refresh_url``) when the link has expired."""
    try:
        url = connect_onboarding_link(
            owner=request.user,
            return_url=request.build_absolute_uri(reverse("payouts_return")),
            refresh_url=request.build_absolute_uri(reverse("payouts_connect")),
        )
    except (PaymentsUnavailable, stripe.StripeError):
        log.exception("onboarding link for user %s failed", request.user.pk)
        context = {"profile": BillingProfile.objects.filter(user=request.user).first(), "unavailable": True}
        return render(request, "billing/payouts_return.html", context, status=503)
    return redirect(url)


@login_required
def payouts_return(request):
    """The owner's payout standing as we last heard it from Stripe (``account.updated``)."""
    profile = BillingProfile.objects.filter(user=request.user).first()
    return render(request, "billing/payouts_return.html", {"profile": profile})
