"""Browser infrastructure smoke test: the login page in Chromium, accessible, keyboard-usable."""

import pytest

from tests.browser import assert_accessible, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_login_page_is_accessible_and_keyboard_usable(live_server, browser_page, owner):
    page = browser_page
    page.goto(f"{live_server.url}/accounts/login/")
    assert_accessible(page)
    screenshot(page, "00-login")

    page.get_by_label("Username").focus()
    page.keyboard.type(owner.username)
    page.keyboard.press("Tab")
    page.keyboard.type("pw-" + owner.username)
    page.keyboard.press("Enter")
    page.wait_for_url("**/portal/units/")
