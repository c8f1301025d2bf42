"""tinychat in a real headless Chromium, against real nodes with the real model (SmolLM2-135M).

Each test types into the page as a person would and reads what the page shows. The answers come
from the session's real node (``single_node_api``) or the two-node ring (``two_node_cluster``).
Screenshots go to test-artifacts/ (tinychat-chat.png, tinychat-phone.png, tinychat-topology.png).
"""

from __future__ import annotations

import json
import re

from pathlib import Path

import aiohttp
import pytest
from helpers import wait_for

expect = pytest.importorskip("playwright.async_api", reason="the playwright Python package is not installed "
                             "(setup.py extra 'test')").expect

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"  # the session fixtures' model
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # made by the browser fixture
ANSWER_TIMEOUT_MS = 90_000  # a loaded 2-core machine; the answers themselves take a few seconds


async def set_options(page, temperature: float = 0.0, max_tokens: int | None = None) -> None:
    """Set generation options through the Settings panel, as a person would."""
    await page.locator("#settings summary").click()
    await page.locator("#temperature").fill(str(temperature))
    if max_tokens is not None:
        await page.locator("#max-tokens").fill(str(max_tokens))
        await page.locator("#max-tokens").dispatch_event("change")
    await page.locator("#settings summary").click()


async def ask(page, text: str) -> None:
    await page.locator("#input").fill(text)
    await page.locator("#input").press("Enter")


async def wait_answered(page, n_answers: int) -> None:
    """Wait until the page shows ``n_answers`` assistant messages and is no longer generating."""
    await page.wait_for_function(
        "n => document.body.dataset.generating === 'false' && document.querySelectorAll('.msg.assistant').length >= n",
        arg=n_answers, timeout=ANSWER_TIMEOUT_MS)


async def test_chat_streams_a_markdown_answer_with_speed_figures(single_node_api, open_page):
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await expect(page.locator("#model")).to_have_value(MODEL)
    await set_options(page, temperature=0, max_tokens=48)
    # While the answer streams, Stop replaces Send. A short answer can be over before a poll of
    # the page sees it (a flake once decode got fast), so the page records the buttons itself
    # the moment it turns busy.
    await page.evaluate("""() => {
        window.busyButtons = [];
        const visible = id => document.getElementById(id).checkVisibility();
        new MutationObserver(() => {
            if (document.body.dataset.generating === 'true') window.busyButtons.push({stop: visible('stop'), send: visible('send')});
        }).observe(document.body, {attributes: true, attributeFilter: ['data-generating']});
    }""")
    await ask(page, "What is the capital of France?")

    answer = page.locator(".msg.assistant").last
    await expect(answer.locator(".content")).to_contain_text("Paris", timeout=ANSWER_TIMEOUT_MS)
    await wait_answered(page, 1)
    assert await page.evaluate("window.busyButtons") == [{"stop": True, "send": False}]
    await expect(page.locator("#send")).to_be_visible()
    await expect(page.locator("#stop")).to_be_hidden()

    # rendered as Markdown (paragraphs), with time to first token and tokens per second
    assert await answer.locator(".content p").count() >= 1
    stats = answer.locator(".stats")
    await expect(stats.locator(".ttft")).to_have_text(re.compile(r"^TTFT \d+\.\d\d s$"))
    await expect(stats.locator(".tps")).to_have_text(re.compile(r"^\d+\.\d tok/s$"))
    tps = float((await stats.locator(".tps").inner_text()).split()[0])
    assert tps > 0
    await expect(page.locator("#error")).to_be_hidden()
    await page.screenshot(path=str(ARTIFACTS / "tinychat-chat.png"))


async def test_conversation_survives_a_reload(single_node_api, open_page):
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await set_options(page, temperature=0, max_tokens=32)
    await ask(page, "What is the capital of France?")
    await wait_answered(page, 1)
    before = await page.locator(".msg.assistant .content").last.inner_text()
    assert before.strip()

    await page.reload()
    await expect(page.locator("#conversations .conv")).to_have_count(1)
    await expect(page.locator("#conversations .conv.current .conv-title")).to_have_text("What is the capital of France?")
    await expect(page.locator(".msg.user .content")).to_have_text("What is the capital of France?")
    await expect(page.locator(".msg.assistant .content")).to_have_text(before)
    await expect(page.locator(".msg.assistant .stats .tps")).to_have_text(re.compile(r"tok/s$"))
    # the settings survive too
    await expect(page.locator("#max-tokens")).to_have_value("32")


async def test_conversations_new_switch_delete(single_node_api, open_page):
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await set_options(page, temperature=0, max_tokens=4)
    await ask(page, "Name a colour.")
    await wait_answered(page, 1)
    await page.locator("#new-chat").click()
    await expect(page.locator("#welcome")).to_be_visible()
    await ask(page, "Name an animal.")
    await wait_answered(page, 1)

    convs = page.locator("#conversations .conv")
    await expect(convs).to_have_count(2)
    await expect(convs.first.locator(".conv-title")).to_have_text("Name an animal.")  # most recent first
    await convs.filter(has_text="Name a colour.").locator(".conv-open").click()
    await expect(page.locator(".msg.user .content")).to_have_text("Name a colour.")

    await convs.filter(has_text="Name an animal.").locator(".conv-delete").click()
    await expect(convs).to_have_count(1)
    await page.reload()
    await expect(page.locator("#conversations .conv .conv-title")).to_have_text(["Name a colour."])
    stored = await page.evaluate("localStorage.getItem('tinychat.v1')")
    assert [c["title"] for c in json.loads(stored)["conversations"]] == ["Name a colour."]


async def test_stop_button_ends_a_long_answer_and_frees_the_kv_cache(single_node_api, open_page):
    node = single_node_api.node
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await set_options(page, temperature=0, max_tokens=2000)
    await ask(page, "Write a very long story about a dragon who learns to bake bread. Use at least 1500 words.")
    answer = page.locator(".msg.assistant").last
    await page.wait_for_function("""() => {
        const c = document.querySelector('.msg.assistant .content');  // five words of the answer shown
        return c && !c.querySelector('.waiting') && c.innerText.trim().split(/\\s+/).length >= 5;
    }""", timeout=ANSWER_TIMEOUT_MS)
    assert node.active_request_ids or node.engine.cached_request_ids(), "the node is not generating the answer"
    # streamed: part of the answer is on screen while the node is still generating the rest,
    # drawn several times as tokens arrived
    await page.wait_for_function(
        "() => Number(document.querySelector('.msg.assistant').dataset.renders || 0) >= 2", timeout=ANSWER_TIMEOUT_MS)
    await expect(page.locator("#stop")).to_be_visible()
    await page.locator("#stop").click()

    await expect(page.locator("#send")).to_be_visible()
    await expect(page.locator("#stop")).to_be_hidden()
    await expect(answer.locator(".note")).to_have_text("Stopped.")
    await expect(page.locator("#error")).to_be_hidden()
    words = len((await answer.locator(".content").inner_text()).split())
    assert words < 1500, f"the answer ran on to {words} words"

    def request_over() -> bool:
        return not node.engine.cached_request_ids() and not node.active_request_ids

    await wait_for(request_over, timeout=20)
    # the stopped answer is kept, marked as stopped
    stored = json.loads(await page.evaluate("localStorage.getItem('tinychat.v1')"))
    last = stored["conversations"][0]["messages"][-1]
    assert last["stopped"] is True and last["content"]


async def test_api_error_is_shown_in_plain_words(single_node_api, open_page):
    """A model the cluster cannot serve (say it went away after the page listed it): the API's
    404 reaches the person as words, and the page is ready for the next message."""
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await expect(page.locator("#model")).to_have_value(MODEL)
    await page.evaluate("""() => {
        const sel = document.getElementById('model');
        sel.append(new Option('gone-model', 'gone-model'));
        sel.value = 'gone-model';
    }""")
    await ask(page, "Hello?")
    await expect(page.locator("#error")).to_be_visible()
    await expect(page.locator("#error-text")).to_contain_text("Not found on this cluster")
    await expect(page.locator("#error-text")).to_contain_text("gone-model")
    answer = page.locator(".msg.assistant").last
    await expect(answer.locator(".note.error")).to_contain_text("gone-model")
    await expect(answer.locator(".note.error button")).to_have_text("Retry")
    await expect(page.locator("#stop")).to_be_hidden()  # no spinner left behind
    await expect(page.locator("#send")).to_be_enabled()
    await page.locator("#error-close").click()
    await expect(page.locator("#error")).to_be_hidden()


async def test_lost_connection_is_shown_and_retry_recovers(single_node_api, open_page):
    """The browser loses the node (network down): the person is told so in words, and Retry
    sends the question again once the network is back."""
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await expect(page.locator("#model")).to_have_value(MODEL)
    await set_options(page, temperature=0, max_tokens=4)
    await put.context.set_offline(True)
    await ask(page, "Name a colour.")
    await expect(page.locator("#error-text")).to_contain_text("Can't reach the exo node")
    await expect(page.locator("#stop")).to_be_hidden()
    await put.context.set_offline(False)
    await page.locator(".msg.assistant .note.error button").click()
    await wait_answered(page, 1)
    await expect(page.locator(".msg.assistant")).to_have_count(1)
    await expect(page.locator(".msg.assistant .stats .tps")).to_be_visible()
    await expect(page.locator(".msg.assistant .note.error")).to_have_count(0)
    await expect(page.locator("#error")).to_be_hidden()


async def test_model_selector_shows_state(single_node_api, open_page):
    async with aiohttp.ClientSession() as http:
        async with http.get(single_node_api.base_url + "/models") as r:
            listed = {m["id"]: m for m in (await r.json())["data"]}
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    options = page.locator("#model option")
    await expect(options).to_have_count(len(listed))
    assert sorted(await options.evaluate_all("os => os.map(o => o.value)")) == sorted(listed)
    state = listed[MODEL].get("state", "ready")
    kind, label = {"ready": ("ready", "ready"), "loading": ("loading", "loading"),
                   "available": ("idle", "loads on first use")}[state]
    await expect(page.locator(f"#model option[value='{MODEL}']")).to_have_attribute("data-state", kind)
    await expect(page.locator("#model-state")).to_have_text(label)
    # every state the API (or a download in progress) can report gets its own words
    shown = await page.evaluate("""() => [
        {state: 'ready'}, {state: 'loading'}, {state: 'available'},
        {state: 'downloading', download_progress: {downloaded_bytes: 42, total_bytes: 100}}, {id: 'no-state'},
    ].map(m => window.tinychat.modelStatus(m).label)""")
    assert shown == ["ready", "loading", "loads on first use", "downloading 42%", "ready"]


async def test_model_output_is_sanitized_and_code_highlighted(single_node_api, open_page):
    """Model output is untrusted: an answer carrying HTML/JS must render inert, and its code
    blocks highlighted. The answer is put in the page's storage, as a finished answer would be."""
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    hostile = (
        "Sure! <img src=x onerror=\"window.__pwned='img'\"> <script>window.__pwned='script'</script>\n\n"
        "[a link](javascript:window.__pwned='link') and <a href=\"https://example.com\" onclick=\"window.__pwned='a'\">b</a>\n\n"
        "<iframe src=\"javascript:window.top.__pwned='iframe'\"></iframe>\n\n"
        "```python\ndef greet(name):\n    return f'hello {name}'\n```\n"
    )
    conv = {"id": "c1", "title": "hostile", "model": MODEL, "createdAt": 1, "updatedAt": 2,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": hostile}]}
    await page.evaluate("data => localStorage.setItem('tinychat.v1', JSON.stringify(data))",
                        {"conversations": [conv], "currentId": "c1"})
    await page.reload()
    content = page.locator(".msg.assistant .content")
    await expect(content).to_contain_text("Sure!")
    await expect(content.locator("pre code.hljs .hljs-keyword").first).to_have_text("def")
    await expect(content.locator(".code-bar")).to_contain_text("python")
    assert await content.locator("img, script, iframe").count() == 0
    assert await content.locator("[onclick], [onerror]").count() == 0
    assert await content.locator("a[href^='javascript']").count() == 0
    await content.locator("a", has_text="a link").click()
    assert await page.evaluate("window.__pwned") is None
    # the library renderer itself, as the page uses it for every streamed chunk
    html = await page.evaluate("s => window.tinychat.renderMarkdown(s)", hostile)
    assert "onerror" not in html and "<script" not in html and "javascript:" not in html


async def test_phone_sized_screen(single_node_api, open_page):
    put = await open_page(single_node_api.api_url + "/", viewport={"width": 390, "height": 844},
                          device_scale_factor=2, is_mobile=True, has_touch=True)
    page = put.page
    await set_options_on_phone(page)
    await ask(page, "What is the capital of France?")
    await wait_answered(page, 1)
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone's screen"
    box = await page.locator("#composer").bounding_box()
    assert box["y"] + box["height"] <= 844 and box["width"] <= 390
    await page.screenshot(path=str(ARTIFACTS / "tinychat-phone.png"))
    # the cluster view covers the screen and closes again
    await page.locator("#toggle-topology").click()
    panel = await page.locator("#topology").bounding_box()
    assert panel["width"] == pytest.approx(390, abs=1)
    await expect(page.locator("#topology-nodes .node-card")).to_have_count(1)
    await page.locator("#close-topology").click()
    await expect(page.locator("#topology")).to_be_hidden()


async def set_options_on_phone(page) -> None:
    """On a phone the settings live in the slide-in sidebar: open it, set, close it."""
    sidebar = page.locator("#sidebar")
    assert (await sidebar.bounding_box())["x"] < 0, "the sidebar should be off-screen on a phone"
    await page.locator("#toggle-sidebar").click()
    await expect(page.locator("#toggle-sidebar")).to_have_attribute("aria-expanded", "true")
    await page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    await set_options(page, temperature=0, max_tokens=24)
    await page.locator("#scrim").click(position={"x": 370, "y": 400})
    await page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().right <= 0")


async def test_topology_view_single_node(single_node_api, open_page):
    node = single_node_api.node
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await expect(page.locator("#node-count")).to_have_text("1")
    await page.locator("#toggle-topology").click()
    card = page.locator(f"#topology-nodes .node-card[data-node-id='{node.id}']")
    await expect(card).to_have_count(1)
    await expect(card.locator(".badge.self")).to_have_text("this node")
    await expect(card.locator("dd").filter(has_text="of 30")).to_have_text("0–29 (30 of 30)")
    await expect(card).to_contain_text("Memory")


async def test_topology_view_lists_both_nodes_and_shows_the_working_one(two_node_cluster, open_page):
    a, b = two_node_cluster
    put = await open_page(a.api_url + "/")
    page = put.page
    await page.locator("#toggle-topology").click()
    cards = page.locator("#topology-nodes .node-card")
    await expect(cards).to_have_count(2)
    ids = sorted(await cards.evaluate_all("els => els.map(e => e.dataset.nodeId)"))
    assert ids == sorted([a.node.id, b.node.id])
    for n in (a, b):
        card = page.locator(f".node-card[data-node-id='{n.node.id}']")
        await expect(card.locator("dd").filter(has_text="of 30")).to_have_text(re.compile(r"^\d+–\d+ \(\d+ of 30\)$"))
    await expect(page.locator(f".node-card[data-node-id='{a.node.id}'] .badge.self")).to_have_text("this node")
    # one bar per model the cluster serves (other tests may have loaded more); the default's has two parts
    await expect(page.locator(".layer-bar[aria-label='Layers of smollm2-135m by node'] .segment")).to_have_count(2)

    # while an answer is computed, the view marks a node as working
    await set_options(page, temperature=0, max_tokens=400)
    await ask(page, "Write a long story about a lighthouse keeper.")
    await expect(page.locator("#topology-nodes .node-card.active").first).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    await page.screenshot(path=str(ARTIFACTS / "tinychat-topology.png"))
    if await page.locator("#stop").is_visible():
        await page.locator("#stop").click()
    await wait_answered(page, 1)
    for n in (a, b):
        await wait_for(lambda n=n: not n.node.engine.cached_request_ids(), timeout=20)
