from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render

from marketplace.accounts import services
from marketplace.accounts.forms import ProfileForm, SignUpForm


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
            login(request, user)
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


# The admin app ships templates under registration/ with these views' default names and comes
# first in INSTALLED_APPS, so ours live under accounts/ and are named here.
class PasswordResetView(_FormErrorsAre400, auth_views.PasswordResetView):
    template_name = "accounts/password_reset_form.html"
    email_template_name = "accounts/password_reset_email.txt"
    subject_template_name = "accounts/password_reset_subject.txt"


class PasswordResetConfirmView(_FormErrorsAre400, auth_views.PasswordResetConfirmView):
    template_name = "accounts/password_reset_confirm.html"


class PasswordChangeView(_FormErrorsAre400, auth_views.PasswordChangeView):
    template_name = "accounts/password_change_form.html"
