"""tinychat on a node that requires an API key, in a real headless Chromium.

The node runs the dummy engine (answers in milliseconds, no weights) with ``auth.api_keys`` set,
and serves this repository's tinychat. The page reads ``GET /health`` (``auth_required``), asks
for a key, says plainly when the node refuses one, keeps the right one in localStorage, and
sends it (``Authorization: Bearer KEY``) with every API call: model list, chat, topology.
Screenshot: test-artifacts/tinychat-key.png (a refused key).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from helpers import NodeUnderTest, loopback_config

expect = pytest.importorskip("playwright.async_api", reason="the playwright Python package is not installed "
                             "(setup.py extra 'test')").expect

from test_browser import ask, set_options, wait_answered  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
KEY = "tinychat-test-key"
STORED = "tinychat.apiKey"  # tinychat's localStorage item
API_PATHS = ("/v1/", "/api/")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # made by the browser fixture


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed_node() -> AsyncIterator[NodeUnderTest]:
    """A dummy-engine node (tinychat served from this repository) that requires KEY."""
    from exo.config import AuthConfig
    from exo.orchestration.launcher import start_node

    running = await start_node(loopback_config(node_id="tinychat-keyed", discovery_module="none", inference_engine="dummy",
                                               api_options={"auth": AuthConfig(api_keys=[KEY])}))
    try:
        yield NodeUnderTest(running)
    finally:
        await running.stop()


def record_auth(page) -> list[tuple[str, str | None]]:
    """(path, Authorization header) of every API request the page sends from now on."""
    sent: list[tuple[str, str | None]] = []

    def on_request(req):
        path = urlsplit(req.url).path
        if path.startswith(API_PATHS):
            sent.append((path, req.headers.get("authorization")))

    page.on("request", on_request)
    return sent


def key_box(page):
    return page.get_by_role("textbox", name="API key")


async def stored_key(page) -> str | None:
    return await page.evaluate("k => localStorage.getItem(k)", STORED)


async def test_asks_for_a_key_refuses_a_wrong_one_and_chats_with_the_right_one(keyed_node, open_page):
    put = await open_page(keyed_node.api_url + "/")
    page = put.page
    sent = record_auth(page)
    prompt = page.locator("#key-prompt")
    await expect(prompt).to_be_visible()
    await expect(key_box(page)).to_be_focused()
    await expect(key_box(page)).to_have_attribute("type", "password")

    await key_box(page).fill("not-the-key")
    await page.get_by_role("button", name="Use this key").click()
    await expect(page.locator("#key-message")).to_contain_text("refused")
    await expect(page.locator("#key-message")).to_contain_text("Incorrect API key")  # the node's own words
    await expect(prompt).to_be_visible()
    await expect(key_box(page)).to_have_value("")
    assert await stored_key(page) is None
    await page.screenshot(path=str(ARTIFACTS / "tinychat-key.png"))

    await key_box(page).fill(KEY)
    await key_box(page).press("Enter")
    await expect(prompt).to_be_hidden()
    await expect(page.locator("#model")).to_have_value(MODEL)  # the model list loaded with the key
    assert await stored_key(page) == KEY

    await set_options(page, temperature=0, max_tokens=6)
    await ask(page, "hi")
    await wait_answered(page, 1)
    await expect(page.locator(".msg.assistant .content")).to_have_text(re.compile(r"\S"))
    await expect(page.locator(".msg.assistant .note.error")).to_have_count(0)
    await expect(page.locator("#error")).to_be_hidden()

    # every API call after the key was taken carried it; the chat stream too
    refused = sent.index(("/v1/models", "Bearer not-the-key"))
    after = sent[refused + 1:]
    assert ("/v1/chat/completions", f"Bearer {KEY}") in after
    assert {auth for _, auth in after} == {f"Bearer {KEY}"}, after

    # kept across a reload: no prompt, the models load
    await page.reload()
    await expect(page.locator("#model")).to_have_value(MODEL)
    await expect(prompt).to_be_hidden()
    assert await stored_key(page) == KEY
    await page.locator("#settings summary").click()
    await expect(page.locator("#key-state")).to_have_text("kept in this browser")


async def test_a_refused_kept_key_is_forgotten_and_the_key_can_be_forgotten(keyed_node, open_page):
    url = keyed_node.api_url
    # a key kept from before that the node no longer accepts
    put = await open_page(url + "/", storage_state={"cookies": [], "origins": [
        {"origin": url, "localStorage": [{"name": STORED, "value": "an-old-key"}]}]})
    page = put.page
    await expect(page.locator("#key-prompt")).to_be_visible()
    await expect(page.locator("#key-message")).to_contain_text("refused")
    await expect(page.locator("#error")).to_be_hidden()  # said once, in the prompt
    assert await stored_key(page) is None

    await key_box(page).fill(KEY)
    await page.get_by_role("button", name="Use this key").click()
    await expect(page.locator("#model")).to_have_value(MODEL)

    # Settings: change (cancel keeps the key), then forget
    await page.locator("#settings summary").click()
    await page.get_by_role("button", name="Change key").click()
    await expect(page.locator("#key-prompt")).to_be_visible()
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.locator("#key-prompt")).to_be_hidden()
    assert await stored_key(page) == KEY
    await page.get_by_role("button", name="Forget key").click()
    await expect(page.locator("#key-prompt")).to_be_visible()
    await expect(page.locator("#key-state")).to_have_text("none")
    assert await stored_key(page) is None


async def test_a_key_revoked_while_chatting_is_asked_for_again(keyed_node, open_page):
    from exo.api.chat_api.auth import AUTH_CONFIG_KEY

    url = keyed_node.api_url
    put = await open_page(url + "/", storage_state={"cookies": [], "origins": [
        {"origin": url, "localStorage": [{"name": STORED, "value": KEY}]}]})
    page = put.page
    await expect(page.locator("#model")).to_have_value(MODEL)
    await expect(page.locator("#key-prompt")).to_be_hidden()
    await set_options(page, temperature=0, max_tokens=4)

    auth = keyed_node.running.api.app[AUTH_CONFIG_KEY]
    auth.api_keys = ["a-new-key"]  # the operator changes the keys while the page is open
    try:
        await ask(page, "hi")
        await wait_answered(page, 1)
        await expect(page.locator(".msg.assistant .note.error")).to_contain_text("refused")
        await expect(page.locator("#key-prompt")).to_be_visible()
        await expect(page.locator("#key-message")).to_contain_text("refused")
        assert await stored_key(page) is None
        # a message typed while the prompt is open stays in the box
        await ask(page, "still here")
        await expect(page.locator("#input")).to_have_value("still here")
        await expect(key_box(page)).to_be_focused()

        await key_box(page).fill("a-new-key")
        await key_box(page).press("Enter")
        await expect(page.locator("#key-prompt")).to_be_hidden()
        await page.locator(".msg.assistant .note.error").get_by_role("button", name="Retry").click()
        await wait_answered(page, 1)
        await expect(page.locator(".msg.assistant .content")).to_have_text(re.compile(r"\S"))
        await expect(page.locator(".msg.assistant .note.error")).to_have_count(0)
        assert await stored_key(page) == "a-new-key"
    finally:
        auth.api_keys = [KEY]
