import sys

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from billing.api import views as billing_api_views
from marketplace.jobs import views as jobs_views
from marketplace.kernel import health, outages
from marketplace.kernel.api.errors import problem_response
from marketplace.ops import health as readiness
from marketplace.ops import metrics
from nodes.agent.protocol import API_PREFIX

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="portal:unit_list", permanent=False)),
    # The address the demo and the README give for the owner portal.
    path("portal/", RedirectView.as_view(pattern_name="portal:unit_list", permanent=False), name="portal_home"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", readiness.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("accounts/", include("marketplace.accounts.urls")),
    path("portal/", include("nodes.urls")),
    path("portal/", include("billing.urls")),
    path("portal/jobs/", jobs_views.job_list, name="job_list"),
    path("portal/jobs/<uuid:job_id>/residency/", jobs_views.job_residency, name="job_residency"),
    path("api/v1/", include("marketplace.jobs.api.urls")),
    path("api/v1/", include("billing.api.urls")),
    path(API_PREFIX.lstrip("/") + "/", include("marketplace.jobs.agent_api.urls")),
    path("api/stripe/webhook", billing_api_views.stripe_webhook, name="stripe-webhook"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves its start-up script as a file: the Content-Security-Policy allows no inline script.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
]


def _api_or_page(page_handler, status_code: int, code: str, detail: str):
    def handler(request, *args, **kwargs):
        if request.path.startswith("/api/"):
            return problem_response(status_code, code, detail)
        return page_handler(request, *args, **kwargs)

    return handler


def _default(name):
    from django.views import defaults

    return getattr(defaults, name)


handler404 = _api_or_page(_default("page_not_found"), 404, "not-found", "No such resource.")
_server_error = _api_or_page(_default("server_error"), 500, "server-error", "Something went wrong on our side.")


def handler500(request, *args, **kwargs):
    """A 500, unless what failed is an outage (outside a view, e.g. in a middleware): then a 503."""
    if outages.is_outage(sys.exc_info()[1]):
        return outages.outage_response(request)
    return _server_error(request, *args, **kwargs)
