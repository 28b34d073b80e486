"""`WebhookSender`: delivers the controller's decisions and alert transitions to the webhooks of the
controller config (`[[webhooks]]`, `aether.controller.config.Webhook`), without ever blocking it.

- `submit(decision)` never waits: it appends the decision to the queue of every webhook whose
  `events` want it (``alert`` for `alert_firing` / `alert_resolved`, ``decision`` for the rest) and
  returns. Each queue is bounded (`queue_size`): when it is full the oldest entry is dropped and
  counted (`WebhookStats.dropped`).
- One asyncio task per webhook posts its queue in order: `POST url` with the JSON body
  ``{"kind": "alert" | "decision", "decision": {...}}`` (the `Decision` as the API shows it), each
  attempt bounded by the webhook's `timeout`; a failed attempt (no answer, or a status outside 2xx)
  is retried up to `retries` times with exponential backoff (`backoff` doubling up to
  `backoff_cap`), then given up and counted (`failed`). A slow or failing webhook only delays its
  own queue.
- `set_webhooks(hooks)` follows a config change: tasks of removed webhooks end (their queues are
  dropped), new ones start; unchanged webhooks keep their queue.

Only the leader's `ControllerService` submits, so each decision is delivered once (a change of
leader may deliver the last ones twice or not at all: webhooks are notifications, not a log; the
history is `GET /api/v1/controller/decisions`). Several senders may run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence

import aiohttp
import msgspec

from aether.controller.config import Webhook
from aether.controller.types import Decision

__all__ = ["ALERT_KINDS", "WebhookSender", "WebhookStats", "event_of"]

ALERT_KINDS = frozenset({"alert_firing", "alert_resolved"})

_encoder = msgspec.json.Encoder()


def event_of(decision: Decision) -> str:
    """The webhook event a decision is: ``alert`` or ``decision``."""
    return "alert" if decision.kind in ALERT_KINDS else "decision"


class WebhookStats(msgspec.Struct):
    """One webhook's delivery counters (shown in the controller status)."""

    url: str
    events: list[str]
    queued: int = 0
    sent: int = 0
    failed: int = 0
    """Given up after every retry."""
    dropped: int = 0
    """Dropped unsent because the queue was full (the oldest go first)."""
    retries: int = 0
    """Attempts that failed and were tried again."""
    last_error: str | None = None


class _Hook:
    def __init__(self, hook: Webhook, queue_size: int) -> None:
        self.hook = hook
        self.queue: deque[bytes] = deque()
        self.size = queue_size
        self.wake = asyncio.Event()
        self.stats = WebhookStats(hook.url, list(hook.events))
        self.task: asyncio.Task[None] | None = None

    def push(self, body: bytes) -> None:
        if len(self.queue) >= self.size:
            self.queue.popleft()
            self.stats.dropped += 1
        self.queue.append(body)
        self.stats.queued = len(self.queue)
        self.wake.set()


class WebhookSender:
    """The controller's webhook deliveries (see the module docstring)."""

    def __init__(
        self,
        *,
        queue_size: int = 256,
        backoff: float = 0.5,
        backoff_cap: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self._log = logger or logging.getLogger("aether.controller.webhooks")
        self._hooks: dict[bytes, _Hook] = {}  # by the webhook's encoding (a Webhook is not hashable)
        self._session: aiohttp.ClientSession | None = None
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering (on the running loop); webhooks set before start begin now."""
        if self._started:
            return
        self._started = True
        for h in self._hooks.values():
            self._spawn(h)

    async def stop(self) -> None:
        """Stop every delivery task and close the HTTP session (queued deliveries are dropped)."""
        self._started = False
        tasks = [h.task for h in self._hooks.values() if h.task is not None]
        for h in self._hooks.values():
            h.task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _spawn(self, h: _Hook) -> None:
        if h.task is None:
            h.task = asyncio.get_running_loop().create_task(
                self._deliver(h), name=f"aether-webhook-{h.hook.url}"
            )

    # --- configuration and submission -----------------------------------------------------------

    def set_webhooks(self, hooks: Sequence[Webhook]) -> None:
        """Deliver to `hooks` from now on (a config change); unchanged ones keep their queues."""
        wanted = {_encoder.encode(h): h for h in hooks}
        for key in [k for k in self._hooks if k not in wanted]:
            old = self._hooks.pop(key)
            if old.task is not None:
                old.task.cancel()
                old.task = None
        for key, hook in wanted.items():
            if key not in self._hooks:
                h = _Hook(hook, self.queue_size)
                self._hooks[key] = h
                if self._started:
                    self._spawn(h)

    def submit(self, decision: Decision) -> None:
        """Queue `decision` for every webhook that wants its event; never waits."""
        event = event_of(decision)
        body: bytes | None = None
        for h in self._hooks.values():
            if event in h.hook.events:
                if body is None:
                    body = _encoder.encode({"kind": event, "decision": decision})
                h.push(body)

    def stats(self) -> list[WebhookStats]:
        """Counters per webhook, in config order."""
        return [msgspec.structs.replace(h.stats, queued=len(h.queue)) for h in self._hooks.values()]

    # --- delivery -------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Content-Type": "application/json", "User-Agent": "aether-controller"}
            )
        return self._session

    async def _deliver(self, h: _Hook) -> None:
        while True:
            while not h.queue:
                h.wake.clear()
                await h.wake.wait()
            body = h.queue.popleft()
            h.stats.queued = len(h.queue)
            await self._post(h, body)

    async def _post(self, h: _Hook, body: bytes) -> bool:
        hook = h.hook
        delay = self.backoff
        for attempt in range(hook.retries + 1):
            try:
                async with (
                    asyncio.timeout(hook.timeout),
                    self._http().post(hook.url, data=body, allow_redirects=False) as resp,
                ):
                    await resp.read()
                    if 200 <= resp.status < 300:
                        h.stats.sent += 1
                        h.stats.last_error = None
                        return True
                    error = f"HTTP {resp.status}"
            except TimeoutError:
                error = f"no answer within {hook.timeout:g} s"
            except Exception as e:  # refused, reset, a URL aiohttp cannot use...: never ends the task
                error = f"{type(e).__name__}: {e}"
            h.stats.last_error = error
            if attempt < hook.retries:
                h.stats.retries += 1
                await asyncio.sleep(delay)
                delay = min(self.backoff_cap, delay * 2)
        h.stats.failed += 1
        self._log.warning("webhook %s: gave up after %d attempts: %s", hook.url, hook.retries + 1, error)
        return False
