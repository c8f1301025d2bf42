"""The tinygrad InferenceEngine: a ShardedModel in tinygrad plus one KV cache per request.

Environment (install with ``pip install -e .[tinygrad]``):
    - tinygrad 0.14. Its device comes from tinygrad's own ``DEV`` variable (default: the best
      device found; ``CPU`` on a machine without a GPU; ``DEV=CUDA``, ``DEV=METAL`` ...). The old
      ``CPU=1``-style switches are rejected by tinygrad 0.14.
    - The CPU device compiles its kernels with a system ``clang`` (``apt-get install clang``; gcc
      does not substitute). ``DEV=PYTHON`` runs without it but is far too slow to be useful.
    - Compiled kernels are cached on disk by tinygrad (``~/.cache/tinygrad``), so a second
      process starts faster. ``BEAM=2`` makes tinygrad search faster kernels: measured here,
      decode 1.4x faster for ~8 minutes of search on first use (cached on disk after).
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tinygrad import Device

from exo.inference.engine_common import ShardedModelEngine
from exo.inference.inference_engine import ENGINE_SUPPORT
from exo.inference.shard import Shard
from exo.inference.tinygrad.model import ShardedModel
from exo.models.architectures import ModelArgs

logger = logging.getLogger(__name__)

# tinygrad's state (device queues, JIT graphs, schedule caches) is process-global and not
# thread-safe, and its sqlite kernel cache may only be used from the thread that opened it:
# every tinygrad call of every tinygrad engine of a process runs on this one thread.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygrad-engine")


def tinygrad_device() -> str:
    """The device tinygrad runs on ("CPU", "CUDA", "METAL", ...); call on the tinygrad thread.

    Raises:
        RuntimeError: the CPU device was chosen but no ``clang`` is on PATH.
    """
    device = Device.DEFAULT
    if device.split(":")[0] == "CPU" and shutil.which("clang") is None:
        raise RuntimeError("tinygrad's CPU device compiles kernels with clang, which is not installed "
                           "(apt-get install clang)")
    return device


class TinygradInferenceEngine(ShardedModelEngine):
    """Runs a shard of a llama, mistral or qwen2 model with tinygrad, in float32 (see
    ``exo.inference.tinygrad.model``); ``unsupported_reason`` says why it cannot run another.

    Args:
        max_requests: most requests holding a KV cache at once; the least recently used is
            evicted beyond it.
        request_ttl: seconds after which an idle request's KV cache is freed.
        warmup: capture the prefill and decode graphs when a shard is loaded (seconds), so the
            first request does not pay for it.

    Raises:
        RuntimeError: tinygrad's CPU device without ``clang`` (see the module docstring).
    """

    name = "tinygrad"
    executor = _EXECUTOR
    supported_architectures = ENGINE_SUPPORT["tinygrad"][0]

    def __init__(self, max_requests: int = 64, request_ttl: float = 600.0, warmup: bool = True):
        super().__init__(max_requests, request_ttl)
        self.device = _EXECUTOR.submit(tinygrad_device).result()
        self.warmup = warmup

    def _describe(self) -> str:
        return f"tinygrad {self.device}"

    def _build_model(self, args: ModelArgs, shard: Shard) -> ShardedModel:
        return ShardedModel(args, shard)

    def _after_load(self, model: ShardedModel) -> None:
        """Capture the prefill and decode graphs (and the head's) on a scratch KV cache."""
        if not self.warmup:
            return
        cache = model.new_cache()
        if model.shard.is_first_layer:
            x = np.zeros((1, 2), dtype=np.int64)
        else:
            x = np.zeros((1, 2, model.args.hidden_size), dtype=np.float32)
        model(x, cache)
        for _ in range(2):
            model(x[:, :1], cache)
