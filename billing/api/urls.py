from django.urls import path

from billing.api.views import BalanceView

urlpatterns = [
    path("balance", BalanceView.as_view(), name="balance"),
]
