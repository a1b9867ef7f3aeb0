from django.urls import include, path
from rest_framework.routers import SimpleRouter

from billing.api.views import BalanceView
from marketplace.api.views import JobViewSet

router = SimpleRouter(trailing_slash="/?")
router.register("jobs", JobViewSet, basename="job")

urlpatterns = [
    path("", include(router.urls)),
    path("balance", BalanceView.as_view(), name="balance"),
]
