from django.urls import path

from nodes import views

app_name = "portal"
urlpatterns = [
    path("units/", views.unit_list, name="unit_list"),
    path("units/rows/", views.unit_list_rows, name="unit_list_status"),
    path("units/new/", views.unit_register_view, name="unit_register"),
    path("units/<uuid:unit_id>/", views.unit_detail, name="unit_detail"),
    path("units/<uuid:unit_id>/status/", views.unit_status, name="unit_status"),
    path("units/<uuid:unit_id>/enrolment/", views.unit_enrolment, name="unit_enrolment"),
    path("units/<uuid:unit_id>/token/", views.unit_token_reissue, name="unit_token_reissue"),
    path("units/<uuid:unit_id>/policy/", views.unit_policy_edit, name="unit_policy"),
    path("units/<uuid:unit_id>/location/", views.unit_location_edit, name="unit_location"),
    path("units/<uuid:unit_id>/drain/", views.unit_drain, name="unit_drain"),
    path("units/<uuid:unit_id>/resume/", views.unit_resume, name="unit_resume"),
]
