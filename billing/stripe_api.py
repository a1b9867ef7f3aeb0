"""The one seam through which Shedshare talks to Stripe.

Everything that calls Stripe gets its ``stripe.StripeClient`` from :func:`client`. Tests and the
development stack swap the network for an in-process fake (``tests.stripe_fake.FakeStripe``)
with :func:`install`; the SDK above it (encoding, error mapping, idempotency headers) stays real.
"""

import stripe
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from marketplace.kernel.errors import DomainError

_installed: stripe.HTTPClient | None = None


def install(http_client: stripe.HTTPClient) -> None:
    """Route every client made from now on through ``http_client`` instead of the network."""
    global _installed
    _installed = http_client


def uninstall() -> None:
    global _installed
    _installed = None


def installed() -> stripe.HTTPClient | None:
    return _installed


def configured() -> bool:
    """Whether this marketplace can talk to Stripe (a key, or an installed fake)."""
    return bool(settings.STRIPE_SECRET_KEY) or _installed is not None


class PaymentsUnavailable(DomainError):
    status = 503
    code = "payments-unavailable"
    title = "Payments are unavailable"


def client(*, stripe_account: str | None = None) -> stripe.StripeClient:
    """A client for the platform account, or acting as a Connect account when ``stripe_account``
    is given. Retries are off: the outbox retries with the same idempotency key, on its own
    schedule, and a second retry loop underneath it would only hide failures from it."""
    api_key = settings.STRIPE_SECRET_KEY
    if not api_key:
        if _installed is None:
            raise ImproperlyConfigured(
                "Stripe is not configured: set STRIPE_SECRET_KEY (sk_test_… in development), "
                "or install a fake with billing.stripe_api.install(FakeStripe())."
            )
        api_key = "sk_test_fake"
    base = getattr(settings, "STRIPE_API_BASE", "")
    return stripe.StripeClient(
        api_key,
        stripe_account=stripe_account or None,
        base_addresses={"api": base} if base else None,
        max_network_retries=0,
        http_client=_installed,
    )
