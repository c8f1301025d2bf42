"""tinychat as files served by a real node (no browser needed): everything the page loads is
in the repository and served from the node itself (no CDN: clusters are often offline)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

TINYCHAT = Path(__file__).resolve().parents[2] / "tinychat"


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href") and not a["href"].startswith("data:"):
            self.urls.append(a["href"])


def _imports(js: str) -> list[str]:
    return re.findall(r'^import .* from "(\.[^"]+)";', js, flags=re.M)


@pytest.mark.asyncio(loop_scope="session")
async def test_every_asset_is_vendored_and_served_by_the_node(single_node_api):
    base = single_node_api.api_url
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/html")
            assert r.headers["Cache-Control"] == "no-cache"
            html = await r.text()
        parser = _Assets()
        parser.feed(html)
        assert len(parser.urls) >= 6
        pending = list(parser.urls)
        seen = set()
        while pending:
            url = pending.pop()
            assert "://" not in url and not url.startswith("//"), f"index.html loads {url} from outside the node"
            if url in seen:
                continue
            seen.add(url)
            async with http.get(f"{base}/{url.lstrip('/')}") as r:
                assert r.status == 200, url
                body = await r.text()
            if url.startswith("js/"):  # the app's own ES modules: follow their imports
                pending += ["js/" + u[2:] for u in _imports(body) if u.startswith("./")]
        assert {"js/app.js", "js/api.js", "js/markdown.js", "js/store.js", "js/topology.js"} <= seen
        # a file outside the UI directory is never served
        async with http.get(base + "/..%2Fsetup.py") as r:
            assert r.status == 404


def test_vendored_libraries_keep_their_licences():
    vendor = TINYCHAT / "vendor"
    readme = (vendor / "README.md").read_text()
    for lib, licence in [("marked.umd.js", "LICENSE.marked.md"), ("purify.min.js", "LICENSE.dompurify"),
                         ("highlight.min.js", "LICENSE.highlightjs")]:
        assert (vendor / lib).is_file() and (vendor / licence).is_file()
        assert lib in readme and licence in readme
    for js in (TINYCHAT / "js").glob("*.js"):
        text = js.read_text()
        assert not re.search(r"""(src|href|from|import\()\s*=?\s*["'](https?:)?//""", text), f"{js.name} loads from outside the node"
