"""The renter's wallet in real time: what it can still pay for, and stopping work before it runs dry.

Prepaid renters only: a postpaid renter (``BillingProfile.postpaid``) is billed afterwards.
"""

from django.conf import settings
from django.db.models import F, Sum

from billing.models import BillingProfile
from billing.selectors import wallet_balance_micros
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.services import job_stop
from marketplace.kernel import metrics
from marketplace.kernel.errors import StateConflict
from marketplace.kernel.money import run_cost_micros

# How long a stop takes to reach the job and end it (the next heartbeat, then the kill grace):
# running jobs are stopped while the wallet still covers this much more of them, beyond the
# usage not yet posted (USAGE_POSTING_INTERVAL_S).
STOP_MARGIN_S = 60
WALLET_EXHAUSTED = "stopped: the wallet reached its floor; top up to run again"


def postpaid(renter_id) -> bool:
    return BillingProfile.objects.filter(user_id=renter_id, postpaid=True).exists()


def _running_cost_micros(renter_id, seconds: int) -> int:
    """`seconds` more of every job the renter has running or about to run."""
    rate = (
        Allocation.objects.filter(job__renter_id=renter_id, released_at__isnull=True)
        .aggregate(rate=Sum(F("price_per_gpu_hour_micros") * F("gpu_count")))
        .get("rate")
    ) or 0
    return run_cost_micros(price_per_gpu_hour_micros=rate, gpus=1, seconds=seconds)


def wallet_available_micros(renter_id) -> int | None:
    """What the wallet can still start new work with: its balance above the floor, less a
    minimum run of every job already placed or running. None for a postpaid renter."""
    if postpaid(renter_id):
        return None
    balance = wallet_balance_micros(renter_id)
    return balance - settings.WALLET_FLOOR_MICROS - _running_cost_micros(renter_id, settings.WALLET_MIN_RUN_S)


def wallet_guard(*, renter_id) -> list[Job]:
    """Stop the renter's jobs when the wallet, after what has been charged, no longer covers
    the time it takes to stop them: the agents are told at their next heartbeat, the usage up
    to the stop is billed, and the jobs end failed with the reason. Returns the jobs stopped."""
    if postpaid(renter_id):
        return []
    balance = wallet_balance_micros(renter_id)
    margin_s = STOP_MARGIN_S + settings.USAGE_POSTING_INTERVAL_S
    if balance - _running_cost_micros(renter_id, margin_s) >= settings.WALLET_FLOOR_MICROS:
        return []
    stopped = []
    for job in Job.objects.filter(renter_id=renter_id, state__in=Job.ACTIVE_STATES):
        try:
            stopped.append(job_stop(job=job, actor="billing", reason=WALLET_EXHAUSTED))
            metrics.WALLET_FLOOR_STOPS.inc()
        except StateConflict:
            continue  # it ended meanwhile
    return stopped
