from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from billing.selectors import owner_earnings, owner_payable_micros


@login_required
def earnings(request):
    context = {
        "payable_micros": owner_payable_micros(request.user),
        "entries": owner_earnings(request.user),
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "billing/earnings.html", context)
