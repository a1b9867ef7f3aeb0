from django import template

register = template.Library()

REASONS = {
    "jurisdiction": "outside the allowed countries",
    "price_cap": "above the price cap",
    "vram": "too little VRAM",
    "gpu_model": "other GPU models",
    "isolation": "isolation not offered",
    "capacity": "not enough free GPUs",
    "unit_busy": "held whole by another job",
    "unit_refused": "refused this job",
    "lost_race": "taken by another job meanwhile",
}


@register.filter
def pending_summary(reason: dict) -> str:
    """Why a job waits, in words: "0 of 3 units fit: 2 outside the allowed countries, 1 above the price cap"."""
    # Most common reason first; names break ties, since PostgreSQL's jsonb does not keep key order.
    rejected = sorted((reason.get("rejected") or {}).items(), key=lambda item: (-item[1], item[0]))
    parts = [f"{count} {REASONS.get(name, name.replace('_', ' '))}" for name, count in rejected]
    considered = reason.get("units_considered", 0)
    fitting = max(considered - sum(count for _, count in rejected), 0)
    return f"{fitting} of {considered} units fit" + (": " + ", ".join(parts) if parts else "")
