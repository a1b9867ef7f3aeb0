from django.urls import include, path
from rest_framework.routers import SimpleRouter

from marketplace.api.views import JobViewSet

router = SimpleRouter()
# The constructor turns any truthy trailing_slash into "/"; set the pattern afterwards so that
# /api/v1/jobs and /api/v1/jobs/ both resolve (a redirect would drop a POST's body).
router.trailing_slash = "/?"
router.register("jobs", JobViewSet, basename="job")

urlpatterns = [
    path("", include(router.urls)),
]
