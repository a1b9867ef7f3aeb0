from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render

from marketplace.jobs import job_reads, ports
from marketplace.jobs.relay.endpoints import job_services
from marketplace.jobs.residency_record import job_residency_record
from marketplace.jobs.selectors import job_usage, jobs_for


@login_required
def job_list(request):
    jobs = list(jobs_for(request.user).filter(renter=request.user)[:100])
    today = job_reads.jobs_traffic_today([job for job in jobs if job.ports])
    base = request.build_absolute_uri("/").rstrip("/")
    context = {
        "rows": [(job, *job_usage(job), job_services(job, base, today.get(job.pk, {}))) for job in jobs],
        "balance_micros": ports.wallet_balance(request.user),
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "jobs/job_list.html", context)


@login_required
def job_residency(request, job_id):
    """The job's residency record as a page to print or file; the renter's own jobs only."""
    job = get_object_or_404(jobs_for(request.user).filter(renter=request.user), pk=job_id)
    return render(request, "jobs/job_residency.html", {"job": job, "record": job_residency_record(job)})
