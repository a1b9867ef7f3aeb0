"""The addresses people are given (the README, the demo's banner) lead somewhere."""

import pytest
from django.urls import reverse


@pytest.mark.django_db
@pytest.mark.parametrize("address", ["/", "/portal/"])
def test_the_portal_addresses_lead_to_the_owners_units(client, owner, address):
    client.force_login(owner)

    response = client.get(address, follow=True)

    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == reverse("portal:unit_list")
