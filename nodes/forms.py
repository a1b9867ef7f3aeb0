from django import forms
from django_countries import countries
from django_countries.fields import LazyTypedChoiceField


class UnitRegisterForm(forms.Form):
    name = forms.CharField(max_length=80, help_text="Something you will recognise, e.g. 'Garden shed'.")
    country = LazyTypedChoiceField(choices=countries)
    subdivision = forms.RegexField(
        regex=r"^[A-Z]{2}-[A-Z0-9]{1,3}$",
        required=False,
        max_length=6,
        help_text="Optional ISO 3166-2 code, e.g. DE-BY.",
        error_messages={"invalid": "Use an ISO 3166-2 code such as DE-BY."},
    )

    def clean(self):
        data = super().clean()
        sub, country = data.get("subdivision"), data.get("country")
        if sub and country and not sub.startswith(f"{country}-"):
            self.add_error("subdivision", f"The subdivision must belong to the country ({country}-...).")
        return data
