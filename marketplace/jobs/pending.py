"""Why-pending in words: the reasons placement counts, and one sentence summing them up."""

from marketplace.kernel.money import from_micros

# Every reason placement can give for a unit not taking a job, as a renter would read it.
REASONS = {
    "unit_offline": "offline",
    "unit_draining": "draining for maintenance",
    "unit_unresponsive": "not answering",
    "unit_under_review": "under review",
    "jurisdiction": "outside the allowed jurisdictions",
    "location_unverified": "location not verified",
    "location_disputed": "location contradicted by the unit's evidence",
    "agent_country": "with an agent configured for another country",
    "isolation": "isolation not offered",
    "workload_class": "not taking this kind of work",
    "renter_unverified": "taking verified renters only",
    "max_duration": "taking shorter jobs only",
    "availability": "outside the owner's hours for a job this long",
    "unit_refused": "refused this job",
    "unit_busy": "held whole by another job",
    "gpu_model": "other GPU models",
    "vram": "too little VRAM",
    "cuda": "CUDA too old",
    "price_cap": "above the price cap",
    "gpu_share": "GPU shares too small",
    "capacity": "not enough free GPUs",
    "lost_race": "taken by another job meanwhile",
}


def pending_summary(reason: dict | None) -> str:
    """ "0 of 3 units fit: 2 outside the allowed jurisdictions, 1 above the price cap"."""
    reason = reason or {}
    # Most common reason first; names break ties, since PostgreSQL's jsonb does not keep key order.
    rejected = sorted((reason.get("rejected") or {}).items(), key=lambda item: (-item[1], item[0]))
    parts = [f"{count} {REASONS.get(name, name.replace('_', ' '))}" for name, count in rejected]
    considered = reason.get("units_considered", 0)
    fitting = max(considered - sum(count for _, count in rejected), 0)
    summary = f"{fitting} of {considered} units fit" + (": " + ", ".join(parts) if parts else "")
    if short := reason.get("wallet"):
        needed, available = (from_micros(short[key]) for key in ("needed_micros", "available_micros"))
        minutes = short.get("run_s", 0) // 60
        summary += f"; the wallet does not cover a {minutes}-minute run ({needed} needed, {available} available)"
    if stopping := (reason.get("preempting") or {}).get("allocations"):
        jobs = "job is" if stopping == 1 else "jobs are"
        summary += f"; {stopping} interruptible {jobs} being stopped to make room"
    return summary
