import functools

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_POST

from marketplace.kernel.errors import StateConflict
from nodes import selectors, services
from nodes.forms import UnitLocationForm, UnitPolicyForm, UnitRegisterForm
from nodes.models import Unit

# The session remembers which unit each recent registration form made (see UnitRegisterForm).
REGISTRATIONS, REGISTRATIONS_KEPT = "unit_registrations", 20


def _agent_commands(request, token: str) -> list[str]:
    server = request.build_absolute_uri("/").rstrip("/")
    return [
        "pip install shedshare-agent",
        f"shedshare-agent enrol --url {server} --token {token}",
        "shedshare-agent run",
    ]


def _owned_units(request) -> list[Unit]:
    """The caller's units by name, with their live GPU figures."""
    return selectors.with_telemetry(list(selectors.units_for(request.user).order_by("name")))


def _owned_unit(request, unit_id) -> Unit:
    """The caller's unit with its live GPU figures; anyone else's is a 404."""
    return selectors.with_telemetry([get_object_or_404(selectors.units_for(request.user), pk=unit_id)])[0]


@login_required
@require_GET
def unit_list(request):
    return render(request, "nodes/unit_list.html", {"units": _owned_units(request)})


def fragment(view):
    """login_required for the parts a page polls: when the session has ended, htmx is told to
    reload the page (which then asks to log in) instead of being redirected to the login page
    and swapping it into the table."""
    protected = login_required(view)

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated and request.headers.get("HX-Request"):
            return HttpResponse(status=401, headers={"HX-Refresh": "true"})
        return protected(request, *args, **kwargs)

    return wrapper


@fragment
@require_GET
def unit_list_rows(request):
    """The list's rows alone, polled by the list page for live status."""
    return render(request, "nodes/_unit_rows.html", {"units": _owned_units(request)})


@login_required
def unit_register_view(request):
    form = UnitRegisterForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        issued_at = timezone.now()
        location = {name: form.cleaned_data[name] for name in ("name", "country", "subdivision")}
        registered = request.session.setdefault(REGISTRATIONS, {})
        submission = str(form.cleaned_data["submission"] or "")
        earlier = Unit.objects.visible_to(request.user).filter(pk=registered.get(submission), enrolled_at__isnull=True)
        if submission and (unit := earlier.first()):
            # The same form again: its unit is registered already. The token shown then cannot be
            # shown again (only its hash is kept), so the unit gets a fresh one.
            return _token_page(request, unit, services.enrolment_token_issue(unit=unit), issued_at)
        unit, token = services.unit_register(owner=request.user, **location)
        if submission:
            registered[submission] = str(unit.pk)
        request.session[REGISTRATIONS] = dict(list(registered.items())[-REGISTRATIONS_KEPT:])
        return _token_page(request, unit, token, issued_at, status=201)
    return render(request, "nodes/unit_register.html", {"form": form}, status=400 if form.errors else 200)


def _token_page(request, unit: Unit, token: str, issued_at, *, status: int = 200):
    # The token is shown on this response only; it is stored hashed and cannot be shown again.
    context = {
        "unit": unit,
        "token": token,
        "commands": _agent_commands(request, token),
        "ttl_hours": int(settings.ENROLMENT_TOKEN_TTL.total_seconds() // 3600),
        **_enrolment_context(unit, issued_at),
    }
    response = render(request, "nodes/unit_token.html", context, status=status)
    add_never_cache_headers(response)  # no browser cache, proxy or back button may keep the token
    return response


def _enrolment_context(unit: Unit, since) -> dict:
    """Whether the agent has enrolled (since a token was issued, when given), and whether the
    page should keep asking: until the unit has enrolled and sent its first heartbeat."""
    enrolled = unit.enrolled_at is not None and (since is None or unit.enrolled_at >= since)
    return {
        "unit": unit,
        "enrolled": enrolled,
        "since": since,
        "keep_polling": not enrolled or unit.status == Unit.Status.PENDING,
    }


@fragment
@require_GET
def unit_enrolment(request, unit_id):
    unit = get_object_or_404(Unit.objects.visible_to(request.user), pk=unit_id)
    return render(request, "nodes/_enrolment.html", _enrolment_context(unit, _since(request.GET.get("since", ""))))


def _since(value: str):
    """An aware moment from the query string, or None: a bad one only means "any enrolment"."""
    try:
        since = parse_datetime(value.replace(" ", "+"))  # a "+" that was not URL-encoded reads as a space
    except ValueError:
        return None
    return since if since is not None and timezone.is_aware(since) else None


def _unit_page(
    request,
    unit: Unit,
    *,
    policy_form: UnitPolicyForm | None = None,
    location_form: UnitLocationForm | None = None,
    residency_stops: list | None = None,
    maintenance_error: str = "",
    status: int = 200,
):
    context = {
        **_status_context(unit),
        **_enrolment_context(unit, None),
        "policy_form": policy_form or UnitPolicyForm.for_unit(unit),
        "location_form": location_form
        or UnitLocationForm(initial={"country": unit.country.code, "subdivision": unit.subdivision}),
        "location": selectors.unit_location(unit),
        "residency_stops": residency_stops or [],
        "holds": selectors.unit_placement_holds(unit),
        "gpus": selectors.unit_gpus(unit),
        "running": selectors.unit_running(unit),
        "jobs_counted": selectors.unit_jobs_counted(unit),
        "slice_prices": selectors.slice_prices(unit),
        "maintenance_error": maintenance_error,
        "currency": settings.CURRENCY.upper(),
    }
    return render(request, "nodes/unit_detail.html", context, status=status)


def _status_context(unit: Unit) -> dict:
    return {
        "unit": unit,
        "limits": selectors.unit_limits(unit),
        "reasons": selectors.limits_explained(unit, hottest_c=unit.hottest_c),
    }


@login_required
@require_GET
def unit_detail(request, unit_id):
    return _unit_page(request, _owned_unit(request, unit_id))


@fragment
@require_GET
def unit_status(request, unit_id):
    """The unit page's status block alone, polled for live status."""
    return render(request, "nodes/_unit_status.html", _status_context(_owned_unit(request, unit_id)))


@login_required
@require_POST
def unit_token_reissue(request, unit_id):
    unit = _owned_unit(request, unit_id)
    if unit.status == Unit.Status.RETIRED:
        return redirect("portal:unit_detail", unit_id=unit.pk)
    issued_at = timezone.now()
    return _token_page(request, unit, services.enrolment_token_issue(unit=unit), issued_at)


@login_required
@require_POST
def unit_policy_edit(request, unit_id):
    unit = _owned_unit(request, unit_id)
    form = UnitPolicyForm.for_unit(unit, request.POST)
    if form.is_valid():
        try:
            services.unit_policy_update(unit=unit, actor=f"user:{request.user.pk}", **form.policy())
        except ValidationError as error:
            form.add_model_errors(error)
        else:
            return redirect("portal:unit_detail", unit_id=unit.pk)
        unit = _owned_unit(request, unit_id)  # show the stored policy, not the rejected one
    return _unit_page(request, unit, policy_form=form)


@login_required
@require_POST
def unit_location_edit(request, unit_id):
    """The owner corrects the declared location; verification runs again on the evidence."""
    unit = _owned_unit(request, unit_id)
    form = UnitLocationForm(request.POST)
    if not form.is_valid():
        return _unit_page(request, unit, location_form=form)
    # Jobs restricted to places the new location is not in are stopped when it is saved: the
    # owner sees which first, and saves again to confirm.
    stops = selectors.residency_stops(unit, **form.cleaned_data)
    if stops and request.POST.get("confirm_stops") != "yes":
        return _unit_page(request, unit, location_form=form, residency_stops=stops, status=409)
    services.unit_location_declare(unit=unit, actor=f"user:{request.user.pk}", **form.cleaned_data)
    return redirect(f"{unit_detail_url(unit)}#location")


@login_required
@require_POST
def unit_drain(request, unit_id):
    return _maintenance(request, unit_id, services.unit_drain)


@login_required
@require_POST
def unit_resume(request, unit_id):
    return _maintenance(request, unit_id, services.unit_resume)


def _maintenance(request, unit_id, change):
    unit = _owned_unit(request, unit_id)
    try:
        change(unit=unit, actor=f"user:{request.user.pk}")
    except StateConflict as error:
        return _unit_page(request, unit, maintenance_error=error.detail, status=409)
    return redirect(f"{unit_detail_url(unit)}#maintenance")


def unit_detail_url(unit: Unit) -> str:
    return reverse("portal:unit_detail", kwargs={"unit_id": unit.pk})
