"""tinychat's image mode in a real headless Chromium: a person adds the tiny Stable Diffusion
pipeline by its path, picks it, types a prompt, watches the denoising steps and gets the
picture, which downloads as a PNG. The node is real (dummy text engine, real diffusers on
127.0.0.1); the ``open_page`` fixture fails the test if the page asks for anything off loopback."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers import SESSION_TAG, loopback_config

expect = pytest.importorskip("playwright.async_api", reason="the playwright Python package is not installed "
                             "(setup.py extra 'test')").expect

pytestmark = pytest.mark.asyncio(loop_scope="session")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # made by the browser fixture


async def test_image_mode_draws_shows_steps_and_downloads_the_picture(tiny_sd_pipeline, open_page):
    from PIL import Image

    from exo.orchestration.launcher import start_node

    running = await start_node(loopback_config(node_id=f"img-ui-{SESSION_TAG}", discovery_module="none",
                                               inference_engine="dummy", default_model="", image_threads=1))
    try:
        put = await open_page(running.api_base_url + "/")
        page = put.page
        await page.locator("#models-panel summary").click()
        await page.locator("#add-model-name").fill(str(tiny_sd_pipeline))
        await page.locator("#add-model-go").click()
        await expect(page.locator("#model")).to_have_value(str(tiny_sd_pipeline))
        await expect(page.locator(f"#model option[value='{tiny_sd_pipeline}']")).to_contain_text("image")
        await expect(page.locator("#input")).to_have_attribute("placeholder", "Describe an image…")
        # the page records every step it shows (a fast drawing can finish between two polls)
        await page.evaluate("""() => {
            window.stepsShown = [];
            new MutationObserver(() => {
                const p = document.querySelector('.image-progress .waiting');
                if (p && !window.stepsShown.includes(p.textContent)) window.stepsShown.push(p.textContent);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }""")
        await page.locator("#input").fill("a small red house")
        await page.locator("#input").press("Enter")
        picture = page.locator("img.generated-image")
        await expect(picture).to_be_visible(timeout=90_000)
        assert await picture.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
        steps = await page.evaluate("window.stepsShown")
        assert "Drawing… step 1 of 25" in steps and "Drawing… step 25 of 25" in steps, steps
        await expect(page.locator(".msg.user")).to_have_text("a small red house")
        async with page.expect_download() as info:
            await page.locator("a.download-image").click()
        download = await info.value
        data = open(await download.path(), "rb").read()
        assert download.suggested_filename.endswith(".png")
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG" and img.size == (32, 32)
        await page.screenshot(path=str(ARTIFACTS / "tinychat-image.png"))
    finally:
        await running.stop()

