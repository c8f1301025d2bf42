"""The torch InferenceEngine: a ShardedLlama plus one KV cache per request."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from exo.inference.inference_engine import WIRE_HIDDEN_DTYPE, InferenceEngine
from exo.inference.shard import Shard
from exo.inference.torch.model import KVCache, LlamaArgs, ShardedLlama
from exo.models.gguf import gguf_metadata, load_llama_shard_tensors
from exo.models.registry import get_model_card

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _RequestState:
    caches: list[KVCache]
    last_used: float = field(default_factory=time.monotonic)

    @property
    def offset(self) -> int:
        return self.caches[0].offset if self.caches else 0


class TorchInferenceEngine(InferenceEngine):
    """Runs a shard of a Llama model with PyTorch on CPU or CUDA.

    Args:
        device: "cpu", "cuda", ...; default CUDA when available.
        dtype: compute dtype name ("float32", "bfloat16", "float16"); default float32 on CPU,
            bfloat16 on CUDA; ``EXO_TORCH_DTYPE`` overrides the default.
        max_requests: most requests holding a KV cache at once; the least recently used is
            evicted beyond it.
        request_ttl: seconds after which an idle request's KV cache is freed.
    """

    name = "torch"

    def __init__(self, device: str | None = None, dtype: str | None = None, max_requests: int = 64, request_ttl: float = 600.0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or os.environ.get("EXO_TORCH_DTYPE") or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.max_requests = max_requests
        self.request_ttl = request_ttl
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._model: ShardedLlama | None = None
        self._shard: Shard | None = None
        self._requests: OrderedDict[str, _RequestState] = OrderedDict()
        self._load_lock = asyncio.Lock()

    @property
    def shard(self) -> Shard | None:
        return self._shard

    async def ensure_shard(self, shard: Shard) -> None:
        async with self._load_lock:
            if self._shard == shard:
                return
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self._executor, self._load, shard)
            self._model, self._shard = model, shard
            self._requests.clear()

    def _load(self, shard: Shard) -> ShardedLlama:
        t0 = time.perf_counter()
        card = get_model_card(shard.model_id)
        path = card.gguf_path()
        args = LlamaArgs.from_gguf_metadata(gguf_metadata(path))
        if args.n_layers != shard.n_layers:
            raise ValueError(f"shard says {shard.n_layers} layers but {shard.model_id} has {args.n_layers}")
        self._model = None  # drop the previous shard's weights before loading the next
        with torch.device("meta"):
            model = ShardedLlama(args, shard)
        model = model.to_empty(device="cpu")
        tensors = load_llama_shard_tensors(path, shard.start_layer, shard.end_layer, shard.n_layers, args.n_heads, args.n_kv_heads)
        model.load_tensors(tensors)
        del tensors
        model = model.to(device=self.device, dtype=self.dtype).eval()
        logger.info("loaded %s layers %d-%d on %s (%s) in %.1f s, %.1f MiB of weights",
                    shard.model_id, shard.start_layer, shard.end_layer, self.device, self.dtype,
                    time.perf_counter() - t0, _weight_bytes(model) / 2**20)
        return model

    def weight_bytes(self) -> int:
        return _weight_bytes(self._model) if self._model is not None else 0

    async def infer_tensor(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        if self._shard != shard:
            await self.ensure_shard(shard)
        self._validate_input(shard, x)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._infer, request_id, x, position)

    def _validate_input(self, shard: Shard, x: np.ndarray) -> None:
        args = self._model.args
        if shard.is_first_layer:
            if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"the first shard takes token ids of shape (1, T) and an integer dtype, got {x.shape} {x.dtype}")
            if x.min() < 0 or x.max() >= args.vocab_size:
                raise ValueError(f"token ids must be in [0, {args.vocab_size}), got range [{x.min()}, {x.max()}]")
        elif x.ndim != 3 or x.shape[0] != 1 or x.shape[1] < 1 or x.shape[2] != args.hidden_size or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"shard {shard.start_layer}-{shard.end_layer} takes hidden states of shape (1, T, {args.hidden_size}) "
                             f"and a float dtype, got {x.shape} {x.dtype}")

    def _infer(self, request_id: str, x: np.ndarray, position: int) -> np.ndarray:
        model = self._model
        self._evict_idle()
        state = self._requests.get(request_id)
        if position == 0:
            state = _RequestState(model.new_caches(1))
            self._requests[request_id] = state
        elif state is None:
            raise KeyError(f"request {request_id} has no KV cache on this node (position {position})")
        elif state.offset != position:
            raise ValueError(f"request {request_id}: position {position} but the KV cache holds {state.offset} tokens")
        if position + x.shape[1] > model.args.max_seq_len:
            raise ValueError(f"request {request_id}: {position + x.shape[1]} tokens exceed the context of {model.args.max_seq_len}")
        self._requests.move_to_end(request_id)
        state.last_used = time.monotonic()
        while len(self._requests) > self.max_requests:
            evicted, _ = self._requests.popitem(last=False)
            logger.warning("evicting the KV cache of request %s (more than %d requests)", evicted, self.max_requests)
        with torch.inference_mode():
            inp = torch.from_numpy(np.ascontiguousarray(x))
            inp = inp.to(self.device, dtype=torch.long) if model.embed_tokens is not None else inp.to(self.device)
            out = model(inp, state.caches, position)
            if model.lm_head is not None:
                return out[0].float().cpu().numpy()
            return out.to(torch.float32).cpu().numpy().astype(WIRE_HIDDEN_DTYPE, copy=False)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for rid in [r for r, s in self._requests.items() if now - s.last_used > self.request_ttl]:
            logger.info("freeing the idle KV cache of request %s", rid)
            del self._requests[rid]

    async def clear_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def cached_request_ids(self) -> set[str]:
        return set(self._requests)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total
