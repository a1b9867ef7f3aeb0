from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from nodes import services
from nodes.forms import UnitPolicyForm, UnitRegisterForm
from nodes.models import Unit
from nodes.selectors import units_for


def _agent_commands(request, token: str) -> list[str]:
    server = request.build_absolute_uri("/").rstrip("/")
    return [
        "pip install 'shedshare[agent]'",
        f"shedshare-agent enrol --url {server} --token {token}",
        "shedshare-agent run",
    ]


@login_required
def unit_list(request):
    return render(request, "nodes/unit_list.html", {"units": units_for(request.user).order_by("name")})


@login_required
def unit_register_view(request):
    form = UnitRegisterForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        unit, token = services.unit_register(owner=request.user, **form.cleaned_data)
        # The token is shown on this response only; it is stored hashed and cannot be shown again.
        return _unit_page(request, unit, token=token, status=201)
    return render(request, "nodes/unit_register.html", {"form": form}, status=400 if form.errors else 200)


def _owned_unit(request, unit_id) -> Unit:
    return get_object_or_404(Unit.objects.visible_to(request.user), pk=unit_id)


def _unit_page(
    request, unit: Unit, *, token: str | None = None, policy_form: UnitPolicyForm | None = None, status: int = 200
):
    labels = {"quiet_hours": "quiet hours", "power_budget": "power budget", "thermal": "temperature"}
    context = {
        "unit": unit,
        "policy_form": policy_form or UnitPolicyForm.for_unit(unit),
        "in_force": [labels.get(name, name) for name in unit.limits.get("in_force", [])],
        "gpus": unit.gpus.filter(present=True),
        "token": token,
        "commands": _agent_commands(request, token) if token else [],
    }
    return render(request, "nodes/unit_detail.html", context, status=status)


@login_required
def unit_detail(request, unit_id):
    return _unit_page(request, _owned_unit(request, unit_id))


@login_required
@require_POST
def unit_token_reissue(request, unit_id):
    unit = _owned_unit(request, unit_id)
    if unit.status == Unit.Status.RETIRED:
        return redirect("portal:unit_detail", unit_id=unit.pk)
    return _unit_page(request, unit, token=services.enrolment_token_issue(unit=unit))


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
