"""``exo pull MODEL`` as a user runs it: ``python -m exo.main pull`` in a subprocess, against the
hub on 127.0.0.1 (``HF_ENDPOINT``), with its Hugging Face cache in a temporary directory.

It downloads the model and prints where it is (exit 0); a repo the hub lacks, an unreachable
hub, or offline mode with nothing cached: the reason in one line on stderr, no traceback, exit 2,
within seconds (the error cases run at the same time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hub_models import GGUF_FILE

ROOT = Path(__file__).resolve().parents[2]  # run from the checkout: its exo package wins
FAIL_FAST_S = 30.0  # a fresh interpreter importing exo on a busy 2-core machine, then one failed request


def start_pull(name: str, hf_home: Path, **env: str) -> tuple[subprocess.Popen, float]:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_CACHE", "EXO_CONFIG")}
    full.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "PYTHONUNBUFFERED": "1", **env})
    p = subprocess.Popen([sys.executable, "-m", "exo.main", "pull", name], cwd=ROOT, env=full,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, time.monotonic()


def finish(p: subprocess.Popen, started: float, timeout: float = 120) -> tuple[int, str, str, float]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err, time.monotonic() - started


def test_exo_pull_downloads_and_prints_the_path(tiny_hub, tmp_path):
    name = tiny_hub.gguf_repo("exotest/cli-llama-GGUF")
    code, out, err, _ = finish(*start_pull(name, tmp_path / "hf", HF_ENDPOINT=tiny_hub.url))
    assert code == 0, err
    printed, path = out.strip().rsplit(": ", 1)
    assert printed == name
    path = Path(path)
    assert path.name == GGUF_FILE and path.is_relative_to(tmp_path / "hf" / "hub" / "models--exotest--cli-llama-GGUF")
    assert path.read_bytes() == tiny_hub.gguf.read_bytes()
    # a second pull finds it whole: nothing is fetched again
    tiny_hub.server.reset()
    code, out, err, _ = finish(*start_pull(name, tmp_path / "hf", HF_ENDPOINT=tiny_hub.url))
    assert code == 0 and out.strip() == f"{name}: {path}", err
    assert tiny_hub.server.bytes_served(repo="exotest/cli-llama-GGUF") == 0


def test_exo_pull_fails_fast_in_plain_words(tiny_hub, tmp_path):
    runs = {
        "unknown repo": start_pull("exotest/no-such-repo", tmp_path / "a", HF_ENDPOINT=tiny_hub.url),
        "hub out of reach": start_pull("exotest/cli-llama-GGUF", tmp_path / "b", HF_ENDPOINT="http://127.0.0.1:9"),
        "offline": start_pull("exotest/cli-llama-GGUF", tmp_path / "c", HF_ENDPOINT=tiny_hub.url, HF_HUB_OFFLINE="1"),
    }
    words = {"unknown repo": "repository exotest/no-such-repo not found",
             "hub out of reach": "cannot reach the hub at http://127.0.0.1:9",
             "offline": "offline (HF_HUB_OFFLINE is set) and exotest/cli-llama-GGUF is not in the Hugging Face cache"}
    for case, (p, started) in runs.items():
        code, out, err, took = finish(p, started)
        assert code == 2, (case, out, err)
        assert words[case] in err and "Traceback" not in err, (case, err)
        assert err.strip().splitlines()[-1].startswith("exo pull: "), (case, err)
        assert not out and took < FAIL_FAST_S, (case, took)
