"""Ports: how a lower app asks something of the apps above it without importing them.

The lower app declares a port as a module attribute; an upper app fills it in its
``AppConfig.ready()`` with a plain function. Imports then run one way only (billing -> jobs ->
nodes -> kernel) while a use case that starts below ("an allocation was released") still
reaches the app that finishes it above ("post its usage to the ledger")."""

from collections.abc import Callable
from typing import Any


class Hook:
    """Something happened: every registered function is called, in registration order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._receivers: dict[str, Callable[..., Any]] = {}

    def register(self, receiver: Callable[..., Any]) -> Callable[..., Any]:
        # Keyed by qualified name, so registering again (a second ready(), a reload) replaces.
        self._receivers[f"{receiver.__module__}.{receiver.__qualname__}"] = receiver
        return receiver

    def __call__(self, *args, **kwargs) -> None:
        for receiver in list(self._receivers.values()):
            receiver(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Hook {self.name}: {', '.join(self._receivers) or 'none'}>"


class Provider:
    """A question one upper app answers; ``default`` answers while none has registered."""

    def __init__(self, name: str, default: Callable[..., Any]) -> None:
        self.name = name
        self._default = default
        self._answer: Callable[..., Any] | None = None

    def provide(self, answer: Callable[..., Any]) -> Callable[..., Any]:
        self._answer = answer
        return answer

    def __call__(self, *args, **kwargs) -> Any:
        return (self._answer or self._default)(*args, **kwargs)

    def __repr__(self) -> str:
        answer = self._answer or self._default
        return f"<Provider {self.name}: {answer.__module__}.{answer.__qualname__}>"
