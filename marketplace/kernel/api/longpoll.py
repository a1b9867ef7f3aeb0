"""Long polls that hold no thread while they wait.

A DRF view is synchronous, and a synchronous wait holds a web worker thread: eight log waits from
one key once stalled every other renter. So a handler marked ``@long_poll`` does its synchronous
part as usual (authentication, permissions, throttles, validation, a first look) and, when it
must wait, returns ``self.wait_for(...)`` instead of a response. ``LongPollMixin.as_view`` gives
an asynchronous Django view that runs the DRF view in a thread, then waits with ``asyncio.sleep``
(no worker busy, no database connection held between looks), asking ``ready()`` every
``interval_s`` in a thread, and finally builds the answer through the view's own exception
handling and rendering. (Django's ASGI handler keeps each request's own executor thread, idle and
parked, until the request ends; it serves only that request, so a wait starves no one.)

Waits are capped per scope (an API key, a unit): a wait takes one of ``limit`` slots of each of
its scopes in the shared cache, each slot with an expiry a little past the wait, so a request
that died cannot keep its slot. Beyond the cap a view answers at once instead of waiting.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connections
from rest_framework.response import Response

SLOT_GRACE_S = 10  # a slot outlives its wait by this much, then expires even if never released


def wait_slots_take(scopes: dict[str, int], *, seconds: float) -> list[str] | None:
    """A slot in each scope (name -> how many concurrent waits it may hold), or None (and nothing
    kept) when one of them is full. ``cache.add`` is atomic in Redis and in the local cache."""
    taken: list[str] = []
    for scope, limit in scopes.items():
        keys = (f"long-poll:{scope}:{n}" for n in range(limit))
        key = next((key for key in keys if cache.add(key, 1, seconds + SLOT_GRACE_S)), None)
        if key is None:
            cache.delete_many(taken)
            return None
        taken.append(key)
    return taken


def _connections_release() -> None:
    """Close the thread's database connections between looks, so a waiting request holds none
    (inside a transaction, as in tests, the connection stays)."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()


@dataclass
class Wait:
    seconds: float
    ready: Callable[[], bool]  # a quick look (synchronous, may query the database)
    answer: Callable[[], Response]  # the response once ready or out of time
    interval_s: float
    slots: list[str] = field(default_factory=list)


class WaitResponse(Response):
    """What a ``@long_poll`` handler returns to wait: never sent, the async view takes it over."""

    def __init__(self, wait: Wait):
        super().__init__(status=200)
        self.wait = wait


def long_poll(handler):
    """Mark a handler that may return ``self.wait_for(...)``; only its routes become asynchronous."""
    handler.long_poll = True
    return handler


class LongPollMixin:
    @classmethod
    def as_view(cls, actions=None, **initkwargs):
        view = super().as_view(actions, **initkwargs) if actions is not None else super().as_view(**initkwargs)
        handlers = (actions or {}).values() or ["get", "post"]
        if not any(getattr(getattr(cls, name, None), "long_poll", False) for name in handlers):
            return view
        run = sync_to_async(view)

        async def asynchronous_view(request, *args, **kwargs):
            response = await run(request, *args, **kwargs)
            if isinstance(response, WaitResponse):
                response = await response.renderer_context["view"].waited(response.wait)
            return response

        asynchronous_view.__dict__.update(view.__dict__)  # cls, initkwargs, actions, csrf_exempt
        return asynchronous_view

    def wait_for(self, *, seconds: float, ready, answer, interval_s: float, slots: list[str]) -> WaitResponse:
        return WaitResponse(Wait(seconds=seconds, ready=ready, answer=answer, interval_s=interval_s, slots=slots))

    async def waited(self, wait: Wait):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait.seconds
        try:
            await sync_to_async(_connections_release)()
            while (left := deadline - loop.time()) > 0:
                await asyncio.sleep(min(wait.interval_s, left))
                if await sync_to_async(self._look)(wait.ready):
                    break
        finally:
            await sync_to_async(cache.delete_many)(wait.slots)
        return await sync_to_async(self._answer)(wait.answer)

    @staticmethod
    def _look(ready) -> bool:
        try:
            return ready()
        finally:
            _connections_release()

    def _answer(self, answer):
        """``answer()`` as DRF's dispatch would have finished it: errors as problems, then negotiated."""
        try:
            response = answer()
        except Exception as exc:
            response = self.handle_exception(exc)
        return self.finalize_response(self.request, response, *self.args, **self.kwargs)
