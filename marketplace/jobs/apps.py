from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "marketplace.jobs"
    label = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        # Jobs answers what nodes asks of it: what is leased and running on a unit, and what
        # follows a liveness sweep.
        from marketplace.jobs import residency, services, units
        from nodes import ports

        ports.slices_leased.provide(units.slices_leased)
        ports.slices_free.provide(units.slices_free)
        ports.unit_running.provide(units.unit_running)
        ports.unit_jobs_counted.provide(units.unit_jobs_counted)
        ports.liveness_swept.register(services.liveness_followup)
        ports.location_changed.register(residency.unit_residency_enforce)
        ports.residency_stops.provide(residency.residency_stops)
