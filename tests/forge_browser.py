"""Real-browser helpers for the Forge dashboard tests: Debian's Chromium driven by Playwright.

Reusable by any test module (`from forge_browser import ...`, plus the fixtures re-exported there):

- `browser_skip_reason()` -> why the browser tests cannot run here (playwright not installed, or
  no Chromium at `CHROMIUM`: `make browser` installs Debian's package), or None.
- Fixture `chromium` (session): a Playwright `Browser` on Debian's Chromium, launched with
  `CHROMIUM_ARGS` (headless, no sandbox since tests run as root, and no background networking:
  as root without those flags Chromium floods the closed network with requests of its own).
  `playwright install` is never used (it downloads browsers). Skips with the reason when it
  cannot run. Closed (browser process included) when the session ends.
- Fixture `open_dashboard`: a factory `open_dashboard(url) -> Dashboard` opening the page in a
  fresh 1280x800 context. A `Dashboard` records every console error, uncaught page error and
  request of its page; `foreign_requests()` lists requests to any host but loopback and
  `assert_clean()` checks there were none, no console/page errors and no horizontal scrolling.
  When the test ends (pass or fail) every page opened is saved as a screenshot under `ARTIFACTS`
  (`build/test-artifacts/forge/`, ignored by git; `AETHER_TEST_ARTIFACTS=DIR` moves it), the path is
  printed and added to the test's report (`user_properties`), then the context is closed.

The helpers know nothing about the API behind the page, so the same tests can drive the fake API
of tests/test_forge_dashboard.py or a real `aether forge` (pass its URL, `?token=...` included).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("AETHER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("AETHER_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts" / "forge"))
VIEWPORT = {"width": 1280, "height": 800}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def browser_skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (it is in the dev extras: make install)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}: `make browser` installs Debian's package (needs root and apt-get)"
    return None


def is_loopback_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    host = (parts.hostname or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass
class Dashboard:
    """One dashboard page and what it did."""

    page: Any  # playwright.sync_api.Page
    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def by_test_id(self, test_id: str) -> Any:
        return self.page.get_by_test_id(test_id)

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if not is_loopback_url(u)]

    def horizontal_overflow(self) -> int:
        """How many CSS pixels the page is wider than its viewport (0: no horizontal scrolling)."""
        return int(
            self.page.evaluate(
                "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
                " - document.documentElement.clientWidth"
            )
        )

    def assert_clean(self, expected_statuses: set[int] | frozenset[int] = frozenset()) -> None:
        """No console errors (but Chromium's "Failed to load resource" for the HTTP error statuses
        the test provoked), no uncaught errors, no request off loopback, no horizontal scrolling."""
        errors = [e for e in self.console_errors if _http_status(e) not in expected_statuses]
        assert errors == [], f"console errors: {errors}"
        assert self.page_errors == [], f"uncaught page errors: {self.page_errors}"
        assert self.foreign_requests() == [], f"requests off loopback: {self.foreign_requests()}"
        overflow = self.horizontal_overflow()
        assert overflow <= 0, f"horizontal scrolling: the page is {overflow} px wider than the viewport"

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{_safe(name)}.png"
        self.page.evaluate("() => window.scrollTo(0, 0)")  # the sticky header at the top
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _http_status(console_error: str) -> int | None:
    m = re.match(r"Failed to load resource: the server responded with a status of (\d+)", console_error)
    return int(m.group(1)) if m else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:120] or "page"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium through Playwright's sync API, for one test module. Not wider: the sync
    API runs an event loop in the main thread while it is started, and every asyncio test after
    it in the session would fail with "cannot be called from a running event loop"."""
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
    except Exception:
        pw.stop()
        raise
    try:
        yield browser
    finally:
        try:
            browser.close()
        finally:
            pw.stop()


@pytest.fixture
def open_dashboard(chromium: Any, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Dashboard]]:
    opened: list[tuple[Any, Dashboard]] = []

    def open_(url: str) -> Dashboard:
        context = chromium.new_context(viewport=VIEWPORT)
        context.set_default_timeout(15_000)
        page = context.new_page()
        dash = Dashboard(page=page, url=url)
        page.on("console", lambda m: dash.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: dash.page_errors.append(str(e)))
        page.on("request", lambda r: dash.requests.append(r.url))
        opened.append((context, dash))
        page.goto(url, wait_until="load")
        return dash

    try:
        yield open_
    finally:
        for i, (context, dash) in enumerate(opened):
            name = request.node.nodeid.split("::", 1)[-1] + (f"-{i + 1}" if len(opened) > 1 else "")
            try:
                path = dash.screenshot(name)
                print(f"screenshot: {path}")
                request.node.user_properties.append(("screenshot", str(path)))
            except Exception as e:  # the test's own failure matters more than a missing screenshot
                print(f"screenshot of {name} failed: {e}")
            context.close()
