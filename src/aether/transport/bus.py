"""In-process typed publish/subscribe, so components (consensus, managers, metrics) stay decoupled.

A `EventBus` is an ordinary object: create one per node (there is no global instance).
Dispatch is synchronous; handlers must not block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["EventBus"]

T = TypeVar("T")

_Entry = tuple[int, Callable[[Any], None]]


class EventBus:
    """Typed pub/sub.

    ``publish(msg)`` calls, synchronously and in subscription order, every handler subscribed to
    ``type(msg)`` or to one of its base classes (subscribe to ``object`` to see everything). An
    exception raised by a handler is logged with its traceback and does not stop the others.
    Subscribing or unsubscribing from inside a handler takes effect from the next publish.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("aether.transport.bus")
        self._subs: dict[type, list[_Entry]] = {}
        self._seq = 0
        self._cache: dict[type, tuple[Callable[[Any], None], ...]] = {}

    def subscribe(self, msg_type: type[T], handler: Callable[[T], None]) -> Callable[[], None]:
        """Call `handler` for every published instance of `msg_type`; returns an idempotent unsubscribe."""
        if not isinstance(msg_type, type):
            raise TypeError(f"msg_type must be a class, got {msg_type!r}")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self._seq += 1
        entry: _Entry = (self._seq, handler)
        self._subs.setdefault(msg_type, []).append(entry)
        self._cache.clear()

        def unsubscribe() -> None:
            entries = self._subs.get(msg_type)
            if entries is None:
                return
            for i, existing in enumerate(entries):
                if existing is entry:
                    del entries[i]
                    if not entries:
                        del self._subs[msg_type]
                    self._cache.clear()
                    return

        return unsubscribe

    def publish(self, msg: object) -> None:
        """Dispatch `msg` to its handlers; never raises because of a handler."""
        cls = type(msg)
        handlers = self._cache.get(cls)
        if handlers is None:
            handlers = self._resolve(cls)
        for handler in handlers:
            try:
                handler(msg)
            except Exception:
                self._log.exception("message handler %r failed on %s", handler, cls.__name__)

    def handler_count(self, msg_type: type) -> int:
        """How many handlers a published instance of exactly `msg_type` would reach."""
        handlers = self._cache.get(msg_type)
        if handlers is None:
            handlers = self._resolve(msg_type)
        return len(handlers)

    def _resolve(self, cls: type) -> tuple[Callable[[Any], None], ...]:
        entries: list[_Entry] = []
        for base in cls.__mro__:
            entries.extend(self._subs.get(base, ()))
        entries.sort(key=lambda e: e[0])
        handlers = tuple(h for _, h in entries)
        self._cache[cls] = handlers
        return handlers
