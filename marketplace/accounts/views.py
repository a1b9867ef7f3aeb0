from axes.helpers import get_cool_off
from axes.utils import reset as axes_reset
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render

from marketplace.accounts import services
from marketplace.accounts.forms import ProfileForm, SignUpForm
from marketplace.kernel.addresses import client_address
from marketplace.kernel.ratelimit import Limiter, wait_header


def sign_up(request):
    if request.user.is_authenticated:
        return redirect("portal:unit_list")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            user = services.user_sign_up(username=data["username"], email=data["email"], password=data["password1"])
        except ValidationError as error:
            form.add_error(None, error)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("portal:unit_list")
    return render(request, "accounts/sign_up.html", {"form": form}, status=400 if form.errors else 200)


@login_required
def profile(request):
    form = ProfileForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            services.user_profile_update(user=request.user, **form.cleaned_data)
        except ValidationError as error:
            form.add_error(None, error)
        else:
            messages.success(request, "Your profile is saved.")
            return redirect("profile")
    return render(request, "accounts/profile.html", {"form": form}, status=400 if form.errors else 200)


class _FormErrorsAre400:
    """Django's account pages answer a form with errors with 200; the portal's pages answer 400."""

    def form_invalid(self, form):
        return self.render_to_response(self.get_context_data(form=form), status=400)


class LoginView(_FormErrorsAre400, auth_views.LoginView):
    redirect_authenticated_user = True


def login_locked_out(request, original_response=None, credentials=None):
    """What django-axes answers for a login it has locked out (the portal's and the admin's): a
    page saying so and for how long, with Retry-After; the password is not even checked."""
    cool_off = get_cool_off(request)
    minutes = max(1, int(cool_off.total_seconds() // 60)) if cool_off else None
    response = render(request, "accounts/locked_out.html", {"minutes": minutes}, status=429)
    if cool_off:
        response["Retry-After"] = wait_header(cool_off.total_seconds())
    return response


def _reset_limiters() -> list[Limiter]:
    return [
        Limiter("password-reset", settings.PASSWORD_RESET_RATE_LIMIT),
        Limiter("password-reset-email", settings.PASSWORD_RESET_EMAIL_RATE_LIMIT),
    ]


# The admin app ships templates under registration/ with these views' default names and comes
# first in INSTALLED_APPS, so ours live under accounts/ and are named here.
class PasswordResetView(_FormErrorsAre400, auth_views.PasswordResetView):
    """Without mail (production with no mail server configured) the page says reset is
    unavailable and sends nothing. Requests are limited per address and per e-mail address."""

    template_name = "accounts/password_reset_form.html"
    email_template_name = "accounts/password_reset_email.txt"
    subject_template_name = "accounts/password_reset_subject.txt"

    def dispatch(self, request, *args, **kwargs):
        if not settings.MAIL_CONFIGURED:
            return render(request, "accounts/password_reset_unavailable.html", status=503)
        return super().dispatch(request, *args, **kwargs)

    def form_valid(self, form):
        by_address, by_email = _reset_limiters()
        wait = by_address.hit(client_address(self.request)) or by_email.hit(form.cleaned_data["email"].lower())
        if wait:
            form.add_error(
                None,
                f"Too many reset requests; try again in {wait_header(wait)} seconds. "
                "If a link was sent, it is in your mailbox.",
            )
            response = self.render_to_response(self.get_context_data(form=form), status=429)
            response["Retry-After"] = wait_header(wait)
            return response
        return super().form_valid(form)


class PasswordResetConfirmView(_FormErrorsAre400, auth_views.PasswordResetConfirmView):
    template_name = "accounts/password_reset_confirm.html"

    def form_valid(self, form):
        # Whoever chose a new password through the mailed link holds the account: a lockout
        # that others' wrong guesses put on it ends here.
        axes_reset(username=self.user.get_username())
        return super().form_valid(form)


class PasswordChangeView(_FormErrorsAre400, auth_views.PasswordChangeView):
    template_name = "accounts/password_change_form.html"
