from django import forms
from django.contrib.auth.forms import SetPasswordMixin, UserCreationForm
from django.core.exceptions import ValidationError

from marketplace.accounts.models import User
from marketplace.accounts.selectors import email_in_use
from marketplace.accounts.services import EMAIL_TAKEN


class _EmailForm(forms.Form):
    """An email address no other account has: the one field sign-up and the profile share."""

    email = forms.EmailField(
        label="Email address",
        help_text="We send password reset links here.",
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
    )
    user = None  # the account whose own address this may be

    def clean_email(self):
        email = self.cleaned_data["email"]
        if email_in_use(email, exclude=self.user):
            raise ValidationError(EMAIL_TAKEN, code="unique")
        return email


class SignUpForm(_EmailForm, UserCreationForm):
    password1, password2 = SetPasswordMixin.create_password_fields(label2="Confirm password")

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ("username", "email")


class ProfileForm(_EmailForm):
    first_name = forms.CharField(max_length=150, required=False, widget=forms.TextInput({"autocomplete": "given-name"}))
    last_name = forms.CharField(max_length=150, required=False, widget=forms.TextInput({"autocomplete": "family-name"}))
    field_order = ["first_name", "last_name", "email"]

    def __init__(self, data=None, *, user):
        initial = {"first_name": user.first_name, "last_name": user.last_name, "email": user.email}
        super().__init__(data, initial=initial)
        self.user = user
