"""What the nodes app asks of the apps above it (jobs), filled in their ``AppConfig.ready()``.

Nodes never imports jobs: leases, allocations and what runs on a unit are the jobs app's, and it
answers these (``marketplace/jobs/apps.py``)."""

from marketplace.kernel.ports import Hook, Provider
from nodes.models import Slice

# The liveness sweep has marked silent units suspect or offline (``now=``): whatever ran on an
# offline unit, or was never picked up, must be dealt with.
liveness_swept = Hook("liveness_swept")

# The slices leased now, as a Slice queryset (nothing is leased while no jobs app answers).
slices_leased = Provider("slices_leased", default=lambda: Slice.objects.none())

# The free slices (advertised, on a present and healthy GPU, not leased), as a Slice queryset:
# the jobs app's one definition (``marketplace.jobs.units.slices_free``), which offers and
# placement use too; nodes does not restate it.
slices_free = Provider("slices_free", default=lambda: Slice.objects.none())

# What runs on a unit now, as ``nodes.selectors.Running`` rows for its owner's page.
unit_running = Provider("unit_running", default=lambda unit: [])

# How many of a unit's jobs its reliability is computed from (0: no history yet).
unit_jobs_counted = Provider("unit_jobs_counted", default=lambda unit: 0)

# The unit's location, its verification or the evidence about it changed (``unit=``, ``actor=``):
# the jobs running there are checked against their residency rules again.
location_changed = Hook("location_changed")

# The running jobs a location change would stop, as ``nodes.selectors.Running`` rows with the
# rule each would break (``unit=``, ``country=``, ``subdivision=``): the owner is warned first.
residency_stops = Provider("residency_stops", default=lambda unit, country, subdivision: [])
