"""The owner portal's money pages, mounted under /portal/."""

from django.urls import path

from billing import views

urlpatterns = [
    path("earnings/", views.earnings, name="earnings"),
    path("earnings.csv", views.earnings_csv, name="earnings_csv"),
    path("payouts/connect/", views.payouts_connect, name="payouts_connect"),
    path("payouts/return/", views.payouts_return, name="payouts_return"),
]
