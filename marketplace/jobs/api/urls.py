from django.urls import include, path, re_path
from rest_framework.routers import SimpleRouter

from marketplace.accounts.api.keys import ApiKeyViewSet
from marketplace.accounts.api.secrets import SecretViewSet
from marketplace.jobs.api.offers import OfferSearchView
from marketplace.jobs.api.templates import JobTemplateViewSet
from marketplace.jobs.api.views import JobViewSet

router = SimpleRouter()
# The constructor turns any truthy trailing_slash into "/"; set the pattern afterwards so that
# /api/v1/jobs and /api/v1/jobs/ both resolve (a redirect would drop a POST's body).
router.trailing_slash = "/?"
router.register("jobs", JobViewSet, basename="job")
router.register("api-keys", ApiKeyViewSet, basename="api-key")
router.register("secrets", SecretViewSet, basename="secret")
router.register("templates", JobTemplateViewSet, basename="job-template")

urlpatterns = [
    re_path(r"^offers/?$", OfferSearchView.as_view(), name="offers"),
    path("", include(router.urls)),
]
