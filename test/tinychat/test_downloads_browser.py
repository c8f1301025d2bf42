"""tinychat's model list and downloads, in a real headless Chromium against the real node
(``single_node_api``, torch engine), with a model from the hub on 127.0.0.1 (``hub_models``).

A person adds a Hugging Face model by name (it is listed as not downloaded), is told in words
that it must be downloaded before chatting, presses Download, watches its progress (the hub
holds the transfer half-way for as long as the test looks), sees it become available, and
chats with it. Screenshot: test-artifacts/tinychat-download.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from hub_models import hub_env

expect = pytest.importorskip("playwright.async_api", reason="the playwright Python package is not installed "
                             "(setup.py extra 'test')").expect

from test_browser import ANSWER_TIMEOUT_MS, ask, set_options, wait_answered  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
HEADER = 1 << 20  # what naming a GGUF fetches (the downloader's header probe)


async def models_by_id(nut) -> dict[str, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(nut.base_url + "/models") as r:
            return {m["id"]: m for m in (await r.json())["data"]}


async def test_the_selector_groups_models_by_state(single_node_api, open_page):
    listed = await models_by_id(single_node_api)
    put = await open_page(single_node_api.api_url + "/")
    page = put.page
    await expect(page.locator("#model")).to_have_value(MODEL)
    await expect(page.locator("#model option")).to_have_count(len(listed))
    here = page.locator("#model optgroup[label='On this node'] option")
    absent = page.locator("#model optgroup[label^='Not downloaded'] option")
    assert await here.evaluate_all("os => os.map(o => o.value)") == sorted(
        i for i, m in listed.items() if m["state"] in ("ready", "loading", "available"))
    assert await absent.evaluate_all("os => os.map(o => o.value)") == sorted(
        i for i, m in listed.items() if m["state"] == "not downloaded")
    assert await absent.count() > 10  # the catalogue's models, most of them not on this machine
    first = await absent.first.get_attribute("value")
    await expect(absent.first).to_have_attribute("data-state", "absent")
    await expect(absent.first).to_have_text(re.compile(r" — not downloaded$"))
    await page.locator("#model").select_option(first)
    await expect(page.locator("#model-state")).to_have_text("not downloaded")
    await expect(page.locator("#model-download")).to_be_visible()
    await page.locator("#model").select_option(MODEL)
    await expect(page.locator("#model-download")).to_be_hidden()
    await expect(page.locator("#model-progress")).to_be_hidden()


async def test_download_a_hub_model_watch_its_progress_then_chat_with_it(single_node_api, tiny_hub, open_page,
                                                                          tmp_path):
    node = single_node_api.node
    with hub_env(tiny_hub.url, tmp_path / "hf"):
        name = tiny_hub.gguf_repo("exotest/browser-llama-GGUF")
        try:
            put = await open_page(single_node_api.api_url + "/")
            page = put.page
            await expect(page.locator("#model")).to_have_value(MODEL)

            # named by its hub name: listed as not downloaded, and selected
            await page.locator("#models-panel summary").click()
            await page.locator("#add-model-name").fill(name)
            await page.locator("#add-model-go").click()
            await expect(page.locator("#model")).to_have_value(name)
            option = page.locator(f"#model option[value='{name}']")
            await expect(option).to_have_attribute("data-state", "absent")
            await expect(page.locator("#model-state")).to_have_text("not downloaded")
            assert (await models_by_id(single_node_api))[name]["state"] == "not downloaded"

            # chatting before it is here is refused in words, and the question stays in the box
            await ask(page, "Hello there")
            await expect(page.locator("#error-text")).to_contain_text("not on this node yet")
            await expect(page.locator("#input")).to_have_value("Hello there")
            await expect(page.locator(".msg.assistant")).to_have_count(0)

            # Download: the progress shows while the bytes come (held half-way by the hub)
            tiny_hub.server.hold_transfers(after=HEADER)
            await page.locator("#model-download").click()
            await expect(page.locator("#model-progress")).to_be_visible()
            await expect(page.locator("#model-download")).to_be_hidden()
            await page.wait_for_function("""() => {
                const pct = Number(document.getElementById('model-progress-bar').value);
                return pct > 1 && pct < 99;
            }""", timeout=30_000)
            text = await page.locator("#model-progress-text").inner_text()
            assert re.fullmatch(r"\d{1,2}%", text), text
            await expect(page.locator("#model-state")).to_have_text(re.compile(r"^downloading \d{1,2}%$"))
            await expect(option).to_have_attribute("data-state", "downloading")
            assert (await models_by_id(single_node_api))[name]["state"] == "downloading"
            await page.screenshot(path=str(ARTIFACTS / "tinychat-download.png"))
            tiny_hub.server.release()

            # done: available (loads on first use), no bar, no button
            await expect(option).to_have_attribute("data-state", "idle", timeout=30_000)
            await expect(page.locator("#model-state")).to_have_text("loads on first use")
            await expect(page.locator("#model-progress")).to_be_hidden()
            await expect(page.locator("#model-download")).to_be_hidden()
            await expect(page.locator("#error")).to_be_hidden()
            assert (await models_by_id(single_node_api))[name]["state"] == "available"
            assert node.downloads()[name]["state"] == "done"

            # and it answers
            await set_options(page, temperature=0, max_tokens=8)
            await page.locator("#input").press("Enter")  # the question still in the box
            await wait_answered(page, 1)
            answer = page.locator(".msg.assistant").last
            await expect(answer.locator(".stats .tokens")).to_have_text(re.compile(r"^\d+ tokens$"),
                                                                      timeout=ANSWER_TIMEOUT_MS)
            await expect(answer.locator(".note.error")).to_have_count(0)
            await expect(page.locator("#error")).to_be_hidden()
            assert node.engine_for(name) is not None and node.engine_for(name).shard.n_layers == 8
        finally:
            tiny_hub.server.release()
            if node.engine_for(name) is not None:
                await node.shards.evict(name, "the test is over")
            try:
                await node.delete_model(name)  # other modules share this process's store
            except Exception:
                pass
