from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from billing.selectors import wallet_balance_micros
from marketplace.selectors import job_usage, jobs_for


@login_required
def job_list(request):
    jobs = jobs_for(request.user).filter(renter=request.user)[:100]
    context = {
        "rows": [(job, *job_usage(job)) for job in jobs],
        "balance_micros": wallet_balance_micros(request.user),
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "marketplace/job_list.html", context)
