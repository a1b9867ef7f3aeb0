"""A local, stateful stand-in for the Stripe endpoints Shedshare calls.

``FakeStripe`` is an ``stripe.HTTPClient``: install it with ``billing.stripe_api.install`` and the
official SDK encodes requests, maps errors and sends idempotency keys exactly as it does against
api.stripe.com, while this module answers them from memory. It follows the Stripe rules our code
depends on: idempotent replay, ``idempotency_error`` on a reused key, Stripe-shaped errors, and
faults (a timeout after the request was applied, 429, 500) that tests switch on with
:meth:`FakeStripe.fail_next`.
"""

import asyncio
import copy
import hashlib
import hmac
import io
import json
import re
import secrets
import string
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

import stripe
from stripe._api_version import _ApiVersion

FAULTS = ("timeout_after_apply", "timeout_before_apply", "rate_limit", "server_error")
DEFAULT_AVAILABLE = 10**12  # platform balance in cents; "large" unless a test says otherwise

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(24))}"


def sign(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe would send with ``payload``: ``t=<unix time>,v1=<hex
    HMAC-SHA256 of "<t>.<payload>" keyed with the endpoint secret>``."""
    t = int(time.time()) if timestamp is None else timestamp
    if isinstance(payload, str):
        payload = payload.encode()
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class Call(NamedTuple):
    method: str
    path: str
    params: dict
    idempotency_key: str | None


class StripeFault(Exception):
    """A Stripe-shaped error answer: raised inside a handler, turned into an HTTP response.

    ``saved`` follows Stripe's idempotency rule: a result is saved (and replayed for the same key)
    once the endpoint has begun executing, errors included; a request that fails validation is
    not saved, so the same key may be sent again once the request is fixed."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        saved: bool = True,
    ):
        super().__init__(message)
        self.status = status
        self.saved = saved
        self.error: dict[str, Any] = {"type": type_, "message": message}
        if code:
            self.error["code"] = code
        if param:
            self.error["param"] = param


def _missing(kind: str, id_: str, param: str = "id") -> StripeFault:
    return StripeFault(
        404, "invalid_request_error", f"No such {kind}: '{id_}'", code="resource_missing", param=param, saved=False
    )


def _required(params: dict, *names: str) -> None:
    for name in names:
        if params.get(name) in (None, ""):
            raise StripeFault(
                400,
                "invalid_request_error",
                f"Missing required param: {name}.",
                code="parameter_missing",
                param=name,
                saved=False,
            )


def _int(params: dict, name: str, default: int | None = None) -> int | None:
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StripeFault(
            400,
            "invalid_request_error",
            f"Invalid integer: {value}",
            code="parameter_invalid_integer",
            param=name,
            saved=False,
        ) from None


def _bool(value: Any) -> Any:
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


def _listify(node: Any) -> Any:
    """Form encoding writes lists as ``expand[0]=…``; turn all-digit keyed dicts back into lists."""
    if isinstance(node, dict):
        node = {k: _listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


def parse_params(encoded: str) -> dict:
    """Decode the SDK's form encoding (``metadata[topup_id]=7``) into nested dicts and lists.
    Values stay strings, as they arrive at Stripe; handlers coerce what they need."""
    root: dict = {}
    for key, value in parse_qsl(encoded or "", keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "[]":
                part = str(sum(1 for k in node if k.isdigit()))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return _listify(root)


class _Headers(dict):
    """Case-insensitive response headers: the SDK reads both ``Request-Id`` and ``request-id``."""

    def __init__(self, items: dict[str, str]):
        super().__init__({k.lower(): v for k, v in items.items()})

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


Route = tuple[str, re.Pattern, Callable[..., Any]]


class FakeStripe(stripe.HTTPClient):
    name = "shedshare-fake"

    def __init__(self) -> None:
        super().__init__()
        self.available = DEFAULT_AVAILABLE
        # Connected accounts' balances in cents, by account id; an account not named here has plenty.
        self.connected_available: dict[str, int] = {}
        self.calls: list[Call] = []
        self.headers: list[dict[str, str]] = []  # request headers (lower-cased), one per call
        self.meter_events: list[dict] = []
        self.events: list[dict] = []
        self.now: Callable[[], int] = lambda: int(time.time())
        self._store: dict[str, dict[str, dict]] = {}
        self._idempotency: dict[tuple[str, str], tuple[tuple, tuple[str, int, dict]]] = {}
        self._faults: list[list] = []
        self._lock = threading.RLock()
        self._routes: list[Route] = [
            ("post", "/v1/customers", self._customer_create),
            ("get", "/v1/customers", self._customer_list),
            ("get", "/v1/customers/{id}", self._customer_retrieve),
            ("post", "/v1/customers/{id}", self._customer_update),
            ("post", "/v1/payment_intents", self._payment_intent_create),
            ("get", "/v1/payment_intents", self._payment_intent_list),
            ("get", "/v1/payment_intents/{id}", self._payment_intent_retrieve),
            ("post", "/v1/payment_intents/{id}", self._payment_intent_update),
            ("post", "/v1/payment_intents/{id}/cancel", self._payment_intent_cancel),
            ("post", "/v1/accounts", self._account_create),
            ("get", "/v1/accounts", self._account_list),
            ("get", "/v1/accounts/{id}", self._account_retrieve),
            ("post", "/v1/account_links", self._account_link_create),
            ("post", "/v1/transfers", self._transfer_create),
            ("get", "/v1/transfers", self._transfer_list),
            ("get", "/v1/transfers/{id}", self._transfer_retrieve),
            ("post", "/v1/transfers/{id}/reversals", self._transfer_reversal_create),
            ("get", "/v1/transfers/{id}/reversals", self._transfer_reversal_list),
            ("post", "/v1/refunds", self._refund_create),
            ("get", "/v1/refunds", self._refund_list),
            ("get", "/v1/refunds/{id}", self._refund_retrieve),
            ("get", "/v1/charges/{id}", self._charge_retrieve),
            ("get", "/v1/disputes/{id}", self._dispute_retrieve),
            ("post", "/v1/billing/meter_events", self._meter_event_create),
        ]
        self._routes = [
            (method, re.compile("^" + path.replace("{id}", "(?P<id>[^/]+)") + "$"), handler)
            for method, path, handler in self._routes
        ]

    # -- inspection and test controls ---------------------------------------------------------

    def objects(self, kind: str) -> list[dict]:
        """Stored objects of one kind, by their ``object`` value ("payment_intent", "transfer",
        "customer", "account", "charge", "refund", "transfer_reversal", "account_link"), oldest
        first. Copies: changing them changes nothing here."""
        with self._lock:
            return copy.deepcopy(list(self._store.get(kind, {}).values()))

    def get(self, kind: str, id_: str) -> dict:
        with self._lock:
            return copy.deepcopy(self._store[kind][id_])

    def fail_next(self, path_prefix: str, fault: str, times: int = 1) -> None:
        """Make the next ``times`` requests whose path starts with ``path_prefix`` (e.g.
        "/v1/transfers") fail with ``fault``, one of :data:`FAULTS`:

        * ``timeout_after_apply``: Stripe did the work (and remembers the idempotency key), but
          the answer is lost; the SDK raises ``stripe.APIConnectionError``.
        * ``timeout_before_apply``: the request never arrived; ``stripe.APIConnectionError``.
        * ``rate_limit``: HTTP 429 ``rate_limit`` with ``Retry-After``; ``stripe.RateLimitError``.
        * ``server_error``: HTTP 500 ``api_error``, nothing applied; ``stripe.APIError``.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        with self._lock:
            self._faults.append([path_prefix, fault, times])

    def succeed_payment(self, pi_id: str) -> dict:
        """The customer paid: the PaymentIntent succeeds and gets a succeeded charge."""
        with self._lock:
            pi = self._find("payment_intent", pi_id)
            if pi["status"] in ("succeeded", "canceled"):
                raise ValueError(f"{pi_id} is already {pi['status']}")
            charge = self._charge_make(pi, paid=True)
            pi.update(status="succeeded", amount_received=pi["amount"], latest_charge=charge["id"])
            pi["last_payment_error"] = None
            return copy.deepcopy(pi)

    def fail_payment(
        self, pi_id: str, *, code: str = "card_declined", message: str = "Your card was declined."
    ) -> dict:
        """The customer's card was declined: a failed charge, and the PaymentIntent goes back to
        ``requires_payment_method`` with ``last_payment_error``, as Stripe does."""
        with self._lock:
            pi = self._find("payment_intent", pi_id)
            if pi["status"] in ("succeeded", "canceled"):
                raise ValueError(f"{pi_id} is already {pi['status']}")
            charge = self._charge_make(pi, paid=False)
            pi.update(status="requires_payment_method", latest_charge=charge["id"])
            pi["last_payment_error"] = {
                "type": "card_error",
                "code": code,
                "decline_code": "generic_decline" if code == "card_declined" else None,
                "message": message,
                "charge": charge["id"],
            }
            return copy.deepcopy(pi)

    def account_update(self, acct_id: str, **fields: Any) -> dict:
        """Change a Connect account as onboarding would (``payouts_enabled=True``,
        ``details_submitted=True``, ``charges_enabled=True``). An account that has submitted
        its details gets the ``transfers`` capability, without which transfers to it fail."""
        with self._lock:
            account = self._find("account", acct_id)
            account.update(fields)
            if fields.get("details_submitted"):
                account["capabilities"]["transfers"] = "active"
            return copy.deepcopy(account)

    def dispute(self, charge_id: str, *, amount: int | None = None, status: str = "needs_response") -> dict:
        """The cardholder disputed a charge: a dispute (``dp_…``) for ``amount`` (the whole
        charge by default); call it again with the dispute's id via :meth:`dispute_close`."""
        with self._lock:
            charge = self._find("charge", charge_id)
            charge["disputed"] = True
            return copy.deepcopy(
                self._put(
                    "dispute",
                    {
                        "id": new_id("dp"),
                        "object": "dispute",
                        "amount": charge["amount_captured"] if amount is None else amount,
                        "charge": charge_id,
                        "currency": charge["currency"],
                        "payment_intent": charge["payment_intent"],
                        "reason": "fraudulent",
                        "status": status,
                    },
                )
            )

    def dispute_close(self, dispute_id: str, status: str) -> dict:
        """The dispute ended: ``won`` (the money comes back) or ``lost``."""
        with self._lock:
            dispute = self._find("dispute", dispute_id)
            dispute["status"] = status
            return copy.deepcopy(dispute)

    def event(self, type: str, obj: dict, *, account: str | None = None) -> dict:
        """A Stripe event (``evt_…``) carrying a snapshot of ``obj``; ``account`` marks a Connect
        event. Kept in ``self.events``; sign ``json.dumps(event).encode()`` with :func:`sign`."""
        event = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": _ApiVersion.CURRENT,
            "created": self.now(),
            "data": {"object": obj.to_dict() if isinstance(obj, stripe.StripeObject) else copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        if account:
            event["account"] = account
        self.events.append(event)
        return copy.deepcopy(event)

    # -- the HTTPClient interface the SDK calls -----------------------------------------------

    def request(self, method: str, url: str, headers: Any, post_data: Any = None, *, _usage: Any = None):
        parts = urlsplit(url)
        method = method.lower()
        encoded = parts.query if method in ("get", "delete") else post_data
        if isinstance(encoded, bytes):
            encoded = encoded.decode()
        params = parse_params(encoded or "")
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        key = headers.get("idempotency-key")
        with self._lock:
            self.calls.append(Call(method.upper(), parts.path, params, key))
            self.headers.append(headers)
            return self._dispatch(method, parts.path, params, key, headers.get("stripe-account", ""))

    def request_stream(self, method: str, url: str, headers: Any, post_data: Any = None, *, _usage: Any = None):
        body, status, rheaders = self.request(method, url, headers, post_data)
        return io.BytesIO(body.encode()), status, rheaders

    async def request_async(self, method: str, url: str, headers: Any, post_data: Any = None):
        return self.request(method, url, headers, post_data)

    async def request_stream_async(self, method: str, url: str, headers: Any, post_data: Any = None):
        body, status, rheaders = self.request(method, url, headers, post_data)

        async def chunks():
            yield body.encode()

        return chunks(), status, rheaders

    async def sleep_async(self, secs: float) -> None:
        await asyncio.sleep(secs)

    def close(self) -> None:
        pass

    async def close_async(self) -> None:
        pass

    # -- dispatch, idempotency, faults --------------------------------------------------------

    def _dispatch(self, method: str, path: str, params: dict, key: str | None, account: str):
        fault = self._take_fault(path)
        if fault == "timeout_before_apply":
            raise self._connection_error()
        if fault == "rate_limit":
            return self._error_response(
                StripeFault(
                    429,
                    "invalid_request_error",
                    "Too many requests hit the API too quickly. We recommend an exponential backoff of your requests.",
                    code="rate_limit",
                ),
                {"Retry-After": "1"},
            )
        if fault == "server_error":
            return self._error_response(
                StripeFault(500, "api_error", "Something went wrong on Stripe's end. (fake: injected)")
            )

        fingerprint = (method, path, json.dumps(params, sort_keys=True))
        scope = (account, key) if key and method == "post" else None
        if scope and scope in self._idempotency:
            seen, response = self._idempotency[scope]
            if seen != fingerprint:
                return self._error_response(
                    StripeFault(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        f"used with. Try using a key other than '{key}' if you meant to execute a different request.",
                    )
                )
            body, status, rheaders = response
            replay = dict(rheaders)
            replay["idempotent-replayed"] = "true"
            self._raise_if(fault)
            return body, status, _Headers(replay)

        response, saved = self._apply(method, path, params, account)
        if scope and saved:
            self._idempotency[scope] = (fingerprint, response)
        self._raise_if(fault)
        return response

    def _raise_if(self, fault: str | None) -> None:
        if fault == "timeout_after_apply":
            raise self._connection_error()

    def _connection_error(self) -> stripe.APIConnectionError:
        # The SDK's own HTTP clients turn a timeout into exactly this: a retryable APIConnectionError.
        return stripe.APIConnectionError(
            "Unexpected error communicating with Stripe.  If this problem persists, let us know at "
            "support@stripe.com.\n\n(Network error: ReadTimeout: fake Stripe injected a timeout)",
            should_retry=True,
        )

    def _take_fault(self, path: str) -> str | None:
        for entry in self._faults:
            prefix, fault, times = entry
            if path.startswith(prefix):
                entry[2] = times - 1
                if entry[2] <= 0:
                    self._faults.remove(entry)
                return fault
        return None

    def _apply(self, method: str, path: str, params: dict, account: str):
        for route_method, pattern, handler in self._routes:
            match = pattern.match(path)
            if route_method == method and match:
                try:
                    obj = handler(params, *match.groups())
                except StripeFault as fault:
                    return self._error_response(fault), fault.saved
                return self._response(200, copy.deepcopy(obj)), True
        return self._error_response(
            StripeFault(
                404,
                "invalid_request_error",
                f"Unrecognized request URL ({method.upper()}: {path}). (fake Stripe does not implement it)",
            )
        ), False

    def _response(self, status: int, body: dict, extra: dict | None = None):
        headers = {"Content-Type": "application/json", "Request-Id": new_id("req"), **(extra or {})}
        return json.dumps(body), status, _Headers(headers)

    def _error_response(self, fault: StripeFault, extra: dict | None = None):
        return self._response(fault.status, {"error": fault.error}, extra)

    # -- storage ------------------------------------------------------------------------------

    def _put(self, kind: str, obj: dict) -> dict:
        obj.setdefault("created", self.now())
        obj.setdefault("livemode", False)
        self._store.setdefault(kind, {})[obj["id"]] = obj
        return obj

    def _find(self, kind: str, id_: str, param: str = "id") -> dict:
        try:
            return self._store[kind][id_]
        except KeyError:
            raise _missing(kind.replace("_", " "), id_, param) from None

    def _list(self, kind: str, path: str, params: dict, match: Callable[[dict], bool] = lambda _: True) -> dict:
        """Newest first, ``limit`` (at most 100) at a time, after ``starting_after``, filtered by
        ``created`` (an integer or a dict of gt/gte/lt/lte) as Stripe's list endpoints are."""
        limit = min(_int(params, "limit", 10), 100)
        created = params.get("created")
        bounds = created if isinstance(created, dict) else ({"gte": created, "lte": created} if created else {})
        tests = {"gt": int.__gt__, "gte": int.__ge__, "lt": int.__lt__, "lte": int.__le__}
        bounds = {op: _int(bounds, op) for op in tests if op in bounds}
        rows = [
            obj
            for obj in reversed(self._store.get(kind, {}).values())
            if match(obj) and all(tests[op](obj["created"], value) for op, value in bounds.items())
        ]
        if params.get("starting_after"):
            ids = [obj["id"] for obj in rows]
            if params["starting_after"] in ids:
                rows = rows[ids.index(params["starting_after"]) + 1 :]
        return {"object": "list", "url": path, "has_more": len(rows) > limit, "data": rows[:limit]}

    @staticmethod
    def _metadata(params: dict) -> dict:
        metadata = params.get("metadata") or {}
        return {k: v for k, v in metadata.items() if v != ""}

    # -- customers ----------------------------------------------------------------------------

    def _customer_create(self, params: dict) -> dict:
        return self._put(
            "customer",
            {
                "id": new_id("cus"),
                "object": "customer",
                "email": params.get("email"),
                "name": params.get("name"),
                "description": params.get("description"),
                "metadata": self._metadata(params),
            },
        )

    def _customer_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("customer", id_)

    def _customer_update(self, params: dict, id_: str) -> dict:
        customer = self._find("customer", id_)
        for field in ("email", "name", "description"):
            if field in params:
                customer[field] = params[field] or None
        customer["metadata"] = {**customer["metadata"], **params.get("metadata", {})}
        customer["metadata"] = {k: v for k, v in customer["metadata"].items() if v != ""}
        return customer

    def _customer_list(self, params: dict) -> dict:
        email = params.get("email")
        return self._list("customer", "/v1/customers", params, lambda c: email is None or c["email"] == email)

    # -- payment intents ----------------------------------------------------------------------

    def _payment_intent_create(self, params: dict) -> dict:
        _required(params, "amount", "currency")
        amount = _int(params, "amount")
        if amount < 50:
            raise StripeFault(
                400,
                "invalid_request_error",
                "Amount must be at least $0.50 usd",
                code="amount_too_small",
                param="amount",
                saved=False,
            )
        if params.get("customer"):
            self._find("customer", params["customer"], "customer")
        pi_id = new_id("pi")
        apm = params.get("automatic_payment_methods")
        return self._put(
            "payment_intent",
            {
                "id": pi_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_received": 0,
                "automatic_payment_methods": {k: _bool(v) for k, v in apm.items()} if apm else None,
                "capture_method": "automatic",
                "client_secret": f"{pi_id}_secret_{''.join(secrets.choice(_ALPHABET) for _ in range(25))}",
                "currency": params["currency"].lower(),
                "customer": params.get("customer"),
                "description": params.get("description"),
                "last_payment_error": None,
                "latest_charge": None,
                "metadata": self._metadata(params),
                "payment_method": None,
                "receipt_email": params.get("receipt_email"),
                "status": "requires_payment_method",
                "transfer_group": params.get("transfer_group"),
            },
        )

    def _payment_intent_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("payment_intent", id_)

    def _payment_intent_update(self, params: dict, id_: str) -> dict:
        pi = self._find("payment_intent", id_)
        if "metadata" in params:
            pi["metadata"] = {k: v for k, v in {**pi["metadata"], **params["metadata"]}.items() if v != ""}
        if "description" in params:
            pi["description"] = params["description"] or None
        return pi

    def _payment_intent_cancel(self, params: dict, id_: str) -> dict:
        pi = self._find("payment_intent", id_)
        if pi["status"] == "succeeded":
            raise StripeFault(
                400,
                "invalid_request_error",
                "You cannot cancel this PaymentIntent because it has a status of succeeded.",
                code="payment_intent_unexpected_state",
            )
        pi.update(status="canceled", cancellation_reason=params.get("cancellation_reason"))
        return pi

    def _payment_intent_list(self, params: dict) -> dict:
        customer = params.get("customer")
        return self._list(
            "payment_intent", "/v1/payment_intents", params, lambda p: customer is None or p["customer"] == customer
        )

    def _charge_make(self, pi: dict, *, paid: bool) -> dict:
        return self._put(
            "charge",
            {
                "id": new_id("ch"),
                "object": "charge",
                "amount": pi["amount"],
                "amount_captured": pi["amount"] if paid else 0,
                "amount_refunded": 0,
                "balance_transaction": new_id("txn") if paid else None,
                "currency": pi["currency"],
                "customer": pi["customer"],
                "metadata": dict(pi["metadata"]),
                "paid": paid,
                "payment_intent": pi["id"],
                "refunded": False,
                "status": "succeeded" if paid else "failed",
                "transfer_group": pi["transfer_group"],
            },
        )

    def _charge_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("charge", id_)

    def _dispute_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("dispute", id_)

    # -- refunds ------------------------------------------------------------------------------

    def _refund_create(self, params: dict) -> dict:
        if params.get("payment_intent"):
            pi = self._find("payment_intent", params["payment_intent"], "payment_intent")
            if pi["status"] != "succeeded":
                raise StripeFault(
                    400,
                    "invalid_request_error",
                    f"This PaymentIntent ({pi['id']}) does not have a successful charge to refund.",
                    code="charge_not_refundable" if pi["latest_charge"] else "resource_missing",
                    param="payment_intent",
                )
            charge = self._find("charge", pi["latest_charge"])
        elif params.get("charge"):
            charge = self._find("charge", params["charge"], "charge")
        else:
            raise StripeFault(
                400,
                "invalid_request_error",
                "One of the following params should be provided for this request: payment_intent or charge.",
                code="parameter_missing",
            )
        unrefunded = charge["amount_captured"] - charge["amount_refunded"]
        amount = _int(params, "amount", unrefunded)
        if unrefunded == 0:
            raise StripeFault(
                400,
                "invalid_request_error",
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        if amount <= 0 or amount > unrefunded:
            raise StripeFault(
                400,
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({unrefunded})",
                param="amount",
            )
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount_captured"]
        return self._put(
            "refund",
            {
                "id": new_id("re"),
                "object": "refund",
                "amount": amount,
                "charge": charge["id"],
                "currency": charge["currency"],
                "metadata": self._metadata(params),
                "payment_intent": charge["payment_intent"],
                "reason": params.get("reason"),
                "status": "succeeded",
            },
        )

    def _refund_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("refund", id_)

    def _refund_list(self, params: dict) -> dict:
        pi, charge = params.get("payment_intent"), params.get("charge")
        return self._list(
            "refund",
            "/v1/refunds",
            params,
            lambda r: (pi is None or r["payment_intent"] == pi) and (charge is None or r["charge"] == charge),
        )

    # -- Connect: accounts and onboarding links -----------------------------------------------

    def _account_create(self, params: dict) -> dict:
        requested = params.get("capabilities") or {}
        return self._put(
            "account",
            {
                "id": new_id("acct"),
                "object": "account",
                "type": params.get("type", "express"),
                "country": params.get("country", "US"),
                "email": params.get("email"),
                "default_currency": "usd",
                "business_type": params.get("business_type"),
                "capabilities": {name: "inactive" for name in requested},
                "charges_enabled": False,
                "payouts_enabled": False,
                "details_submitted": False,
                "metadata": self._metadata(params),
            },
        )

    def _account_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("account", id_)

    def _account_list(self, params: dict) -> dict:
        return self._list("account", "/v1/accounts", params)

    def _account_link_create(self, params: dict) -> dict:
        _required(params, "account", "type")
        self._find("account", params["account"], "account")
        created = self.now()
        return {
            "object": "account_link",
            "created": created,
            "expires_at": created + 300,
            "url": f"https://connect.stripe-fake.test/setup/e/{params['account']}/{secrets.token_urlsafe(12)}",
        }

    # -- Connect: transfers and reversals -----------------------------------------------------

    def _transfer_create(self, params: dict) -> dict:
        _required(params, "amount", "currency", "destination")
        amount = _int(params, "amount")
        if amount <= 0:
            raise StripeFault(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 1.",
                param="amount",
                saved=False,
            )
        destination = self._find("account", params["destination"], "destination")
        if destination["capabilities"].get("transfers") != "active":
            raise StripeFault(
                400,
                "invalid_request_error",
                "Your destination account needs to have at least one of the following capabilities enabled: "
                "transfers, crypto_transfers, legacy_payments",
                code="insufficient_capabilities_for_transfer",
                param="destination",
            )
        if amount > self.available:
            raise StripeFault(
                400,
                "invalid_request_error",
                "You have insufficient available funds in your Stripe account. Try adding funds directly to your "
                "available balance by creating Top-ups.",
                code="balance_insufficient",
            )
        self.available -= amount
        transfer_id = new_id("tr")
        return self._put(
            "transfer",
            {
                "id": transfer_id,
                "object": "transfer",
                "amount": amount,
                "amount_reversed": 0,
                "currency": params["currency"].lower(),
                "description": params.get("description"),
                "destination": destination["id"],
                "destination_payment": new_id("py"),
                "metadata": self._metadata(params),
                "reversals": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "url": f"/v1/transfers/{transfer_id}/reversals",
                },
                "reversed": False,
                "source_transaction": params.get("source_transaction"),
                "transfer_group": params.get("transfer_group"),
            },
        )

    def _transfer_retrieve(self, params: dict, id_: str) -> dict:
        return self._find("transfer", id_)

    def _transfer_list(self, params: dict) -> dict:
        group, destination = params.get("transfer_group"), params.get("destination")
        return self._list(
            "transfer",
            "/v1/transfers",
            params,
            lambda t: (
                (group is None or t["transfer_group"] == group)
                and (destination is None or t["destination"] == destination)
            ),
        )

    def _transfer_reversal_create(self, params: dict, id_: str) -> dict:
        transfer = self._find("transfer", id_)
        left = transfer["amount"] - transfer["amount_reversed"]
        amount = _int(params, "amount", left)
        if amount <= 0 or amount > left:
            raise StripeFault(
                400,
                "invalid_request_error",
                f"Transfer {id_} has {left} left to reverse; {amount} requested.",
                param="amount",
            )
        destination = transfer["destination"]
        if amount > self.connected_available.get(destination, amount):
            raise StripeFault(
                400,
                "invalid_request_error",
                f"Insufficient funds in the connected account {destination} to reverse {amount}.",
                code="balance_insufficient",
            )
        if destination in self.connected_available:
            self.connected_available[destination] -= amount
        transfer["amount_reversed"] += amount
        transfer["reversed"] = transfer["amount_reversed"] == transfer["amount"]
        self.available += amount
        reversal = self._put(
            "transfer_reversal",
            {
                "id": new_id("trr"),
                "object": "transfer_reversal",
                "amount": amount,
                "currency": transfer["currency"],
                "metadata": self._metadata(params),
                "transfer": id_,
            },
        )
        transfer["reversals"]["data"].insert(0, copy.deepcopy(reversal))
        return reversal

    def _transfer_reversal_list(self, params: dict, id_: str) -> dict:
        self._find("transfer", id_)
        return self._list("transfer_reversal", f"/v1/transfers/{id_}/reversals", params, lambda r: r["transfer"] == id_)

    # -- Billing meter events -----------------------------------------------------------------

    def _meter_event_create(self, params: dict) -> dict:
        _required(params, "event_name", "payload")
        identifier = params.get("identifier") or new_id("mev")
        if any(event["identifier"] == identifier for event in self.meter_events):
            raise StripeFault(
                400,
                "invalid_request_error",
                f"An event already exists with identifier {identifier}.",
                code="resource_already_exists",
                param="identifier",
            )
        event = {
            "object": "billing.meter_event",
            "created": self.now(),
            "event_name": params["event_name"],
            "identifier": identifier,
            "livemode": False,
            "payload": dict(params["payload"]),
            "timestamp": _int(params, "timestamp", self.now()),
        }
        self.meter_events.append(event)
        return event
