from django.urls import path

from nodes import views

app_name = "portal"
urlpatterns = [
    path("units/", views.unit_list, name="unit_list"),
    path("units/new/", views.unit_register_view, name="unit_register"),
    path("units/<uuid:unit_id>/", views.unit_detail, name="unit_detail"),
    path("units/<uuid:unit_id>/token/", views.unit_token_reissue, name="unit_token_reissue"),
    path("units/<uuid:unit_id>/policy/", views.unit_policy_edit, name="unit_policy"),
]
