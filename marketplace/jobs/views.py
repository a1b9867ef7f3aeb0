from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render

from marketplace.jobs import job_reads, ports
from marketplace.jobs.relay.endpoints import service_url
from marketplace.jobs.residency_record import job_residency_record
from marketplace.jobs.selectors import job_usage, jobs_for


@login_required
def job_list(request):
    jobs = list(jobs_for(request.user).filter(renter=request.user)[:100])
    today = job_reads.jobs_traffic_today([job for job in jobs if job.ports])
    context = {
        "rows": [(job, *job_usage(job), _services(request, job, today)) for job in jobs],
        "balance_micros": ports.wallet_balance(request.user),
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "jobs/job_list.html", context)


def _services(request, job, today: dict) -> list[dict]:
    """The job's ports as its renter reaches them: a URL or the forward command, and the
    requests served today."""
    shown = []
    for entry in job.ports or []:
        port, kind = entry["port"], entry.get("protocol", "http")
        url = service_url(request.build_absolute_uri("/").rstrip("/"), job.pk, port) if kind == "http" else ""
        shown.append({"port": port, "url": url, "forward": f"shedshare forward {job.pk} {port}",
                      "requests": today.get((job.pk, port), 0)})  # fmt: skip
    return shown


@login_required
def job_residency(request, job_id):
    """The job's residency record as a page to print or file; the renter's own jobs only."""
    job = get_object_or_404(jobs_for(request.user).filter(renter=request.user), pk=job_id)
    return render(request, "jobs/job_residency.html", {"job": job, "record": job_residency_record(job)})
