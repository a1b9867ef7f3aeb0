import csv
import logging
from datetime import UTC
from decimal import Decimal

import stripe
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from billing import charts
from billing.payouts import connect_onboarding_link
from billing.selectors import (
    connect_status,
    gpu_hours,
    owner_earnings_by_day,
    owner_payable_micros,
    owner_transfers,
    owner_unit_utilisation,
    owner_usage_lines,
    usage_line_gpu_ms,
)
from billing.statements import Period
from billing.stripe_api import PaymentsUnavailable
from marketplace.kernel.api.renderers import spreadsheet_safe
from marketplace.kernel.money import from_micros

log = logging.getLogger(__name__)

RECENT_EARNINGS = 20
RECENT_TRANSFERS = 20
CSV_HEADER = ["date", "unit", "job_id", "gpu_seconds", "amount", "currency"]


def _recent_lines(user) -> list[dict]:
    lines = owner_usage_lines(user).order_by("-transaction__created_at", "-pk")[:RECENT_EARNINGS]
    return [{**line, "gpu_hours": gpu_hours(usage_line_gpu_ms(line))} for line in lines]


@login_required
def earnings(request):
    now = timezone.now()
    period = Period.default(today=now.astimezone(UTC).date())
    currency = settings.CURRENCY.upper()
    per_day = owner_earnings_by_day(request.user, period)
    units = owner_unit_utilisation(request.user, period, now=now)
    context = {
        "payable_micros": owner_payable_micros(request.user),
        "currency": currency,
        "period": period,
        "per_day": per_day,
        "earnings_chart": charts.earnings_chart(per_day, currency),
        "units": [{**unit, "chart": charts.utilisation_chart(unit, n)} for n, unit in enumerate(units, 1)],
        "lines": _recent_lines(request.user),
        "transfers": owner_transfers(request.user, limit=RECENT_TRANSFERS),
        "connect": connect_status(request.user),
    }
    return render(request, "billing/earnings.html", context)


class _Echo:
    """A file-like sink that hands back each CSV row written to it, for streaming."""

    def write(self, value: str) -> str:
        return value


def _csv_rows(lines):
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_HEADER)
    for line in lines:
        gpu_ms = usage_line_gpu_ms(line)
        yield writer.writerow(
            [
                line["posted_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                spreadsheet_safe(line["unit_name"] or ""),
                line["job_id"] or "",
                "" if gpu_ms is None else Decimal(gpu_ms).scaleb(-3),  # exact: 3,600,000 ms -> 3600.000
                from_micros(line["amount_micros"]),
                line["currency"].upper(),
            ]
        )


@login_required
def earnings_csv(request):
    """Every usage earning of the caller's, oldest first, streamed: an owner's history can be long."""
    lines = owner_usage_lines(request.user).order_by("transaction__created_at", "pk").iterator(chunk_size=2000)
    response = StreamingHttpResponse(_csv_rows(lines), content_type="text/csv; charset=utf-8")
    today = timezone.now().astimezone(UTC).date().isoformat()
    response["Content-Disposition"] = f'attachment; filename="shedshare-earnings-{today}.csv"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
def payouts_connect(request):
    """POST: send the owner to Stripe's onboarding for their own Connect account (creating it
    the first time); Stripe sends them back to ``payouts_return``. A GET changes nothing: it is
    where Stripe sends them (``refresh_url``) when the link has expired, and shows the button
    that asks for a fresh one."""
    if request.method != "POST":
        context = {"connect": connect_status(request.user), "link_expired": True}
        return render(request, "billing/payouts_return.html", context)
    try:
        url = connect_onboarding_link(
            owner=request.user,
            return_url=request.build_absolute_uri(reverse("payouts_return")),
            refresh_url=request.build_absolute_uri(reverse("payouts_connect")),
        )
    except (PaymentsUnavailable, stripe.StripeError):
        log.exception("onboarding link for user %s failed", request.user.pk)
        context = {"connect": connect_status(request.user), "unavailable": True}
        return render(request, "billing/payouts_return.html", context, status=503)
    return redirect(url)


@login_required
def payouts_return(request):
    """The owner's payout standing as Stripe says it now: they have just come back from its onboarding."""
    return render(request, "billing/payouts_return.html", {"connect": connect_status(request.user, live=True)})
