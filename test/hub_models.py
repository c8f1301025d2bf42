"""A tiny model served by the local hub (``hub_server.HubServer``) for the tests of downloads
through a node: its API, Ollama's pull/delete/show, tinychat's Download, ``exo pull``.

``TinyHub`` holds one tiny random llama (8 layers, ~6.9 MB as an F32 GGUF: several times the
1 MiB a node fetches to read a GGUF's header, so naming it leaves it "not downloaded") and
publishes it under any repo name a test asks for (hard links, no copy). Each test module names
its own repos: the process's model store remembers every model it resolved, so two modules
must not share a name. ``hub_env`` points ``huggingface_hub`` at the server, online, with the
cache in a temporary directory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from hub_server import HubServer, make_repo
from tiny_models import build_hf_model, write_gguf

GGUF_FILE = "tiny-llama-F32.gguf"


@dataclass
class TinyHub:
    """The hub server (``server``, ``url``) over ``root``, and the tiny model's files: its
    Hugging Face directory ``hf_dir`` and its GGUF ``gguf``."""

    server: HubServer
    root: Path
    hf_dir: Path
    gguf: Path

    @property
    def url(self) -> str:
        return self.server.url

    def gguf_repo(self, repo_id: str) -> str:
        """Publish the GGUF as ``repo_id`` (with a decoy README); its hub name ``repo_id:FILE``."""
        make_repo(self.root, repo_id, {GGUF_FILE: self.gguf, "README.md": "tiny llama for tests"})
        return f"{repo_id}:{GGUF_FILE}"

    def safetensors_repo(self, repo_id: str) -> str:
        """Publish the Hugging Face directory as ``repo_id``; its hub name."""
        make_repo(self.root, repo_id, {p.name: p for p in sorted(self.hf_dir.iterdir()) if p.is_file()})
        return repo_id


def build_tiny_hub(base: Path) -> TinyHub:
    hf_dir = build_hf_model("llama", base / "llama", num_hidden_layers=8, intermediate_size=1024)
    gguf = write_gguf(hf_dir, base / GGUF_FILE)
    root = base / "repos"
    root.mkdir()
    server = HubServer(root)
    server.start()
    return TinyHub(server, root, hf_dir, gguf)


@contextlib.contextmanager
def hub_env(url: str, hf_home: Path) -> Iterator[None]:
    """``HF_ENDPOINT`` at ``url``, ``HF_HOME`` at ``hf_home``, online (``huggingface_hub`` reads
    ``HF_HUB_OFFLINE`` at import: its constant is patched too), no token; restored after."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", url)
        mp.setenv("HF_HOME", str(hf_home))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield
