from django.urls import path

from billing.api.statements import EarningsStatementView, UsageStatementView
from billing.api.views import BalanceView, TopUpCreateView, TopUpDetailView

urlpatterns = [
    path("balance", BalanceView.as_view(), name="balance"),
    path("top-ups", TopUpCreateView.as_view(), name="top-up-create"),
    path("top-ups/<uuid:topup_id>", TopUpDetailView.as_view(), name="top-up-detail"),
    path("statements/usage", UsageStatementView.as_view(), name="statement-usage"),
    path("statements/earnings", EarningsStatementView.as_view(), name="statement-earnings"),
]
