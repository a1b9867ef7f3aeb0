from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from marketplace.jobs import ports
from marketplace.jobs.selectors import job_usage, jobs_for


@login_required
def job_list(request):
    jobs = jobs_for(request.user).filter(renter=request.user)[:100]
    context = {
        "rows": [(job, *job_usage(job)) for job in jobs],
        "balance_micros": ports.wallet_balance(request.user),
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "jobs/job_list.html", context)
