"""A real headless Chromium (Debian's ``chromium`` package) driven by Playwright's async API.

No browser is downloaded: Playwright launches ``/usr/bin/chromium`` (``CHROMIUM`` overrides the
path), with a fresh temporary profile for the session. The NETWORK RULE holds for the browser
too: background services are switched off, every request the browser would send to a host
other than loopback goes to a dead loopback proxy port (Chromium never proxies loopback, and
resolves no host name of its own when a proxy is set), and
each page records every URL it requests so tests can assert that tinychat asked for nothing
outside the node (no CDN: it must work on an offline cluster).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from network_guard import is_loopback

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-pings",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,CertificateTransparencyComponentUpdater",
    # Every request not to loopback goes through this proxy: the discard port of 127.0.0.1, so
    # nowhere, and Chromium resolves no host name itself (checked with strace: no DNS query).
    # Do not add --host-resolver-rules="MAP * ..." : it fails even 127.0.0.1, and a main-frame
    # DNS error makes Chromium probe public DNS servers (its net-error DNS probe).
    "--proxy-server=http://127.0.0.1:9",
]


def _missing() -> str | None:
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"no Chromium at {CHROMIUM} (scripts/test.sh installs Debian's chromium package)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (setup.py extra 'test')"
    return None


class PageUnderTest:
    """A Playwright page in its own browser context (own localStorage), plus what it requested
    and any uncaught JavaScript error."""

    def __init__(self, context, page):
        self.context, self.page = context, page
        self.urls: list[str] = []
        self.js_errors: list[str] = []
        page.on("request", lambda req: self.urls.append(req.url))
        page.on("pageerror", lambda err: self.js_errors.append(str(err)))

    def outside_requests(self) -> list[str]:
        """URLs requested from anything but loopback (data: and blob: URLs stay in the page)."""
        bad = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about"):
                continue
            if not is_loopback(parts.hostname or ""):
                bad.append(url)
        return bad


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser():
    """One headless Chromium for the whole session (skipped when Chromium or Playwright is missing)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        # launch() gives the browser a fresh temporary user-data-dir, removed on close
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="session")
async def open_page(browser):
    """``await open_page(url, **context_options)`` -> PageUnderTest; closed (with its context) after the test,
    which fails if the page threw an uncaught JavaScript error or requested anything off loopback."""
    opened: list[PageUnderTest] = []

    async def _open(url: str, **context_options) -> PageUnderTest:
        context_options.setdefault("viewport", DESKTOP)
        context = await browser.new_context(**context_options)
        context.set_default_timeout(30_000)
        page = await context.new_page()
        put = PageUnderTest(context, page)
        opened.append(put)
        await page.goto(url)
        return put

    yield _open
    for put in opened:
        await put.context.close()
    for put in opened:
        assert not put.js_errors, f"uncaught JavaScript errors: {put.js_errors}"
        assert not put.outside_requests(), f"tinychat requested URLs off this machine: {put.outside_requests()}"
