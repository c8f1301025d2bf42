"""The torch InferenceEngine: a ShardedTransformer plus one KV cache per request.

Decode steps of concurrent requests that reach the engine together run as one batched forward
pass (``ShardedTransformer.decode``): the weights are read once for the whole batch, which is what
bounds decode speed on a CPU. Model work happens on one worker thread, in the order
``exo.inference.step_scheduler`` decides (decode batches, pipeline groups, prefills in pieces
between them). A finished request's KV cache is kept in the prompt cache
(``exo.inference.prompt_cache``) for later requests that share its prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from exo.inference.inference_engine import WIRE_HIDDEN_DTYPE, InferenceEngine
from exo.inference.prompt_cache import PromptCache
from exo.inference.shard import Shard
from exo.inference.step_scheduler import DecodeStep, PrefillJob, StepScheduler
from exo.inference.torch.gguf_weights import KERNEL_MAX_ROWS
from exo.inference.torch.layers import KVCache
from exo.inference.torch.model import ShardedTransformer
from exo.inference.torch.loading import ShardLoader, release_freed_memory, weight_bytes
from exo.models.architectures import ModelArgs
from exo.topology.device_capabilities import usable_cpus

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHTS = ("auto", "gguf", "dense", "int4")
#: The weights that run on the CPU only, and the one dtype each computes in.
_CPU_WEIGHTS_DTYPE = {"gguf": "float32", "int4": "bfloat16"}
#: The prompt cache's default memory budget, in bytes.
DEFAULT_PROMPT_CACHE_BYTES = 512 * 2**20

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
            bfloat16 on CUDA (``engine.dtype`` in the settings). float32 is the CPU
            default because it is the only one whose logits stay within 1e-3 of the float32
            reference (test/inference/test_torch_model.py); bfloat16 reads half the bytes per
            token and is faster where the CPU has bf16 matrix units, at ~1e-1 logit error.
        max_requests: most requests holding a KV cache at once; the least recently used is
            evicted beyond it.
        request_ttl: seconds after which an idle request's KV cache is freed.
        max_batch: most decode steps run in one forward pass (1 disables batching).
        weights: how the weight matrices are held. "gguf": the file's own quantized blocks
            (Q4_1 layers, Q8_0 embedding and head for SmolLM2), multiplied by float32
            activations with native kernels built at first use (``gguf_weights.py``): the same
            logits as float32 dense weights, at a sixth of the bytes read per token; CPU and
            float32 only. "dense": every matrix dequantized to ``dtype``. "int4": CPU only,
            4-bit projections (the Q4_1 grid, bfloat16 scales) and an 8-bit head with bfloat16
            activations (``quantize.py``; ~1e-1 logit error). "auto" (default): "gguf" where it
            can run (CPU, float32, a C++ compiler, a file in Q4_1/Q8_0), else "dense".
            The settings' ``engine.weights`` chooses it.
        batch_invariant: True (default): a request's logits are the same, bit for bit, whether
            its decode step runs alone or in a batch with other requests', so a seeded request
            samples the same tokens at any load (``ShardedTransformer``'s ``batch_invariant``:
            on the native path batched products stay off the AMX tile unit; on other paths the
            requests of a batch run one after another). False: batched products take the faster
            paths, and logits may differ in the last bits with the batch (on a CPU with AMX, from
            8 requests on). Prefills run one request at a time either way.
        prompt_cache_bytes: memory for the KV caches of finished requests kept for requests
            that share their prefix (the prompt cache; 0 turns it off), in bytes.

    Raises:
        ValueError: an unknown ``dtype`` or ``weights``, ``max_batch`` < 1, "gguf" or "int4" off
            the CPU, "gguf" with a dtype other than float32, or "int4" with one other than
            bfloat16. Loading a shard with "gguf" raises RuntimeError when the kernels cannot be
            built and ValueError when the file's weights are in other GGML types.
    """

    name = "torch"

    def __init__(self, device: str | None = None, dtype: str | None = None, max_requests: int = 64, request_ttl: float = 600.0,
                 max_batch: int = 32, weights: str | None = None, batch_invariant: bool = True,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        #: The ``weights`` asked for, and (``weights``) what the shard held now uses ("auto"
        #: until a shard is loaded).
        self.requested_weights = weights or "auto"
        if self.requested_weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {list(_WEIGHTS)}, got {self.requested_weights!r}")
        fixed = _CPU_WEIGHTS_DTYPE.get(self.requested_weights)
        if fixed is not None:  # a CPU-only kernel that computes in one dtype
            if self.device.type != "cpu":
                raise ValueError(f"weights={self.requested_weights!r} runs on the CPU only, not {self.device}")
            if (dtype or fixed) != fixed:
                raise ValueError(f"weights={self.requested_weights!r} computes in {fixed}, got dtype {dtype!r}")
            dtype = fixed
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.max_requests = max_requests
        self.request_ttl = request_ttl
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.batch_invariant = bool(batch_invariant)
        self._scheduler = StepScheduler(self._on_worker, self._decode_batch, self._prefill_piece, max_batch)
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self._forks: dict[str, tuple[str, int]] = {}  # request -> (prompt cache entry, tokens) it starts from
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        # intra-op threads of a forward pass: one per CPU this process may use (its affinity)
        self._threads = usable_cpus()
        torch.set_num_threads(self._threads)
        self._loader = ShardLoader(self.device, self.dtype, self.requested_weights)
        self._shard: Shard | None = None
        self._requests: OrderedDict[str, _RequestState] = OrderedDict()
        self._load_lock = asyncio.Lock()

    @property
    def shard(self) -> Shard | None:
        return self._shard

    @property
    def batch_sizes(self) -> list[int]:
        """Sizes of the last decode batches (most recent last), for benchmarks and tests."""
        return self._scheduler.batch_sizes

    @property
    def pipeline_depth(self) -> int:
        return self._scheduler.pipeline_depth

    @pipeline_depth.setter
    def pipeline_depth(self, nodes: int) -> None:
        self._scheduler.pipeline_depth = nodes

    @property
    def _model(self) -> ShardedTransformer | None:
        return self._loader.model

    @property
    def weights(self) -> str:
        """What the shard held now uses: "gguf", "dense" or "int4" ("auto" until one is loaded)."""
        return self._loader.weights

    @property
    def last_load(self) -> dict | None:
        """What the latest shard change did (``ShardLoader.last_load``)."""
        return self._loader.last_load

    @property
    def param_bytes(self) -> float:
        """0 where the native kernels keep the checkpoint's own blocks (CPU, float32), else the
        compute dtype's bytes (int4: about 0.6)."""
        if self.requested_weights == "int4":
            return 0.6
        if self.requested_weights in ("gguf", "auto") and self.device.type == "cpu" and self.dtype == torch.float32:
            return 0.0
        return float(torch.finfo(self.dtype).bits // 8)

    async def unload(self) -> None:
        """Drop the shard and every KV cache (on the worker, after any step running)."""
        async with self._load_lock:
            await self._on_worker(self._drop)

    def _drop(self) -> None:
        self._loader.model, self._shard = None, None
        self._requests.clear()
        self.prompt_cache.clear()
        release_freed_memory()

    async def ensure_shard(self, shard: Shard) -> None:
        async with self._load_lock:
            if self._shard == shard:
                return
            await self._on_worker(self._swap_in, shard)

    def _swap_in(self, shard: Shard) -> None:
        self._loader.load(shard, self.batch_invariant)
        self._shard = shard
        self._requests.clear()
        self.prompt_cache.clear()  # keys and values of other layers

    async def _on_worker(self, fn, *args):
        """``fn(*args)`` on the worker thread (the one thread that runs the model)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def unsupported_reason(self, args: ModelArgs) -> str | None:
        """None: this engine runs every architecture and variant ``ModelArgs`` describes."""
        return None

    def weight_bytes(self) -> int:
        return weight_bytes(self._model) if self._model is not None else 0

    async def infer_tensor(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        if self._shard != shard:
            await self.ensure_shard(shard)
        self._validate_input(shard, x)
        if x.shape[1] == 1 and position > 0 and self._scheduler.max_batch > 1:
            return await self._scheduler.decode(request_id, x, position)
        return await self._scheduler.prefill(request_id, x, position)

    async def infer_final_hidden(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        """``InferenceEngine.infer_final_hidden``: one forward pass on the worker, never batched
        with decode steps nor cut in pieces; the last shard returns (1, T, hidden) float32 after
        the final norm."""
        if self._shard != shard:
            await self.ensure_shard(shard)
        self._validate_input(shard, x)
        return await self._on_worker(self._infer, request_id, x, position, True)

    def match_prefix(self, token_ids) -> tuple[str | None, int]:
        """``InferenceEngine.match_prefix``: the prompt cache's longest match."""
        return self.prompt_cache.match(token_ids)

    def continue_from_prefix(self, request_id: str, entry_id: str, n_tokens: int) -> None:
        """``InferenceEngine.continue_from_prefix``: the request's next prefill (at position
        ``n_tokens``) starts from a copy of the entry's first ``n_tokens`` keys and values.

        Raises:
            PromptCacheMiss: no such entry here, or a shorter one.
        """
        self.prompt_cache.get(entry_id, n_tokens)  # a miss answers the sender now
        self._forks[request_id] = (entry_id, n_tokens)

    async def keep_prefix(self, request_id: str, token_ids) -> None:
        """``InferenceEngine.keep_prefix``: the request is over; its KV cache goes into the
        prompt cache under its id, keyed by the first ``offset`` of ``token_ids`` (the tokens
        it holds), unless it holds none or more than the budget."""
        self._scheduler.forget(request_id)
        self._forks.pop(request_id, None)
        state = self._requests.pop(request_id, None)
        if state is None or not state.offset or self.prompt_cache.budget_bytes == 0:
            return
        # what every layer holds (a step that failed part-way leaves later layers shorter), and
        # no more than the origin's tokens
        n = min(min(c.offset for c in state.caches), len(token_ids))
        for c in state.caches:
            c.offset = min(c.offset, n)
        self.prompt_cache.add(request_id, token_ids[:n], state.caches, sum(c.nbytes() for c in state.caches))

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

    def _state_for(self, request_id: str, position: int, n_tokens: int) -> _RequestState:
        """The request's KV cache state for ``n_tokens`` new tokens at ``position`` (a fresh one
        at position 0). Raises KeyError / ValueError as ``infer_tensor`` documents."""
        model = self._model
        state = self._requests.get(request_id)
        if position + n_tokens > model.args.max_seq_len:
            raise ValueError(f"request {request_id}: {position + n_tokens} tokens exceed the context of {model.args.max_seq_len}")
        fork = self._forks.pop(request_id, None) if position > 0 else None
        if position == 0:
            state = _RequestState(model.new_caches(1, capacity=n_tokens + 1))
            self._requests[request_id] = state
        elif fork is not None:
            state = self._requests[request_id] = self._forked_state(*fork, position, n_tokens)
        elif state is None:
            raise KeyError(f"request {request_id} has no KV cache on this node (position {position})")
        elif state.offset != position:
            raise ValueError(f"request {request_id}: position {position} but the KV cache holds {state.offset} tokens")
        self._requests.move_to_end(request_id)
        state.last_used = time.monotonic()
        while len(self._requests) > self.max_requests:
            evicted, _ = self._requests.popitem(last=False)
            logger.warning("evicting the KV cache of request %s (more than %d requests)", evicted, self.max_requests)
        return state

    def _forked_state(self, entry_id: str, n_cached: int, position: int, n_tokens: int) -> _RequestState:
        """A request's state whose first ``n_cached`` (== ``position``) keys and values are
        copied from prompt cache entry ``entry_id``, with room for ``n_tokens`` more.

        Raises:
            PromptCacheMiss: the entry is gone (evicted, a shard change) or shorter.
            ValueError: ``position`` is not ``n_cached``.
        """
        if position != n_cached:
            raise ValueError(f"a request continued from {n_cached} cached tokens must go on at position {n_cached}, not {position}")
        entry = self.prompt_cache.get(entry_id, n_cached)
        caches = self._model.new_caches(1, capacity=n_cached + n_tokens + 1)
        for new, old in zip(caches, entry.kv):
            new.k[:, :, :n_cached] = old.k[:, :, :n_cached]
            new.v[:, :, :n_cached] = old.v[:, :, :n_cached]
            new.offset = n_cached
        return _RequestState(caches)

    def _to_input(self, x: np.ndarray) -> torch.Tensor:
        inp = torch.from_numpy(np.ascontiguousarray(x))
        if self._model.embed_tokens is not None:
            return inp.to(self.device, dtype=torch.long)
        return inp.to(self.device)

    def _to_output(self, out: torch.Tensor) -> np.ndarray:
        """Logits (B, vocab) or hidden states (B, T, hidden) as float32 numpy arrays."""
        return out.to(torch.float32).cpu().numpy().astype(WIRE_HIDDEN_DTYPE, copy=False)

    @contextlib.contextmanager
    def _forward_pass(self, rows: int):
        """Around one forward pass of ``rows`` activation rows, on the worker thread. With GGUF
        blocks, a pass of at most ``KERNEL_MAX_ROWS`` rows (decode) runs its matrix products on
        the kernels' own threads, which spin for the pass and sleep right after it (see
        kernels/gguf_blocks.cpp), and everything else on this thread alone: torch's OpenMP
        threads would keep spinning after the pass and take the cores of the next node's pass
        on the same machine (2-node ring on 2 cores: 0.79x -> 0.84x of one node). Longer
        prefills take the dequantize-and-matmul path on torch's threads; both pools spinning at
        once would fight over the cores (a decode step 20x slower)."""
        if self.weights != "gguf":
            yield
            return
        decode = rows <= KERNEL_MAX_ROWS
        torch.set_num_threads(1 if decode else self._threads)
        if not decode:
            yield
            return
        torch.ops.exo_gguf.set_spin(True)  # counted: engines sharing a process each hold one
        try:
            yield
        finally:
            torch.ops.exo_gguf.set_spin(False)

    def _infer(self, request_id: str, x: np.ndarray, position: int, final_hidden: bool = False) -> np.ndarray:
        self._evict_idle()
        state = self._state_for(request_id, position, x.shape[1])
        with torch.inference_mode(), self._forward_pass(x.shape[1]):
            out = self._to_output(self._model(self._to_input(x), state.caches, position, final_hidden))
        return out[0] if self._model.lm_head is not None and not final_hidden else out

    def _prefill_piece(self, job: PrefillJob, n: int) -> np.ndarray:
        """Tokens ``job.done .. job.done + n`` of a prefill (``StepScheduler``)."""
        return self._infer(job.request_id, job.x[:, job.done:job.done + n], job.position + job.done)

    def _decode_batch(self, steps: list[DecodeStep]) -> list[np.ndarray | Exception]:
        """One forward pass for the decode steps of several requests; per step its output or
        the exception that step raises (a bad step fails alone)."""
        self._evict_idle()
        results: list[np.ndarray | Exception | None] = [None] * len(steps)
        ok: list[tuple[int, DecodeStep, _RequestState]] = []
        seen: set[str] = set()
        for i, s in enumerate(steps):
            try:
                if s.request_id in seen:
                    raise ValueError(f"request {s.request_id}: two decode steps at once")
                ok.append((i, s, self._state_for(s.request_id, s.position, 1)))
                seen.add(s.request_id)
            except Exception as e:
                results[i] = e
        if ok:
            try:
                x = np.concatenate([s.x for _, s, _ in ok]) if len(ok) > 1 else ok[0][1].x
                with torch.inference_mode(), self._forward_pass(len(ok)):
                    out = self._to_output(self._model.decode(self._to_input(x), [st.caches for _, _, st in ok], [s.position for _, s, _ in ok]))
                last = self._model.lm_head is not None
                for j, (i, _, _) in enumerate(ok):
                    results[i] = out[j] if last else out[j:j + 1]
            except Exception as e:
                logger.exception("a decode batch of %d requests failed", len(ok))
                for i, _, _ in ok:
                    results[i] = e
        return results

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for rid in [r for r, s in self._requests.items() if now - s.last_used > self.request_ttl]:
            logger.info("freeing the idle KV cache of request %s", rid)
            del self._requests[rid]

    async def clear_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._forks.pop(request_id, None)
        self._scheduler.forget(request_id)

    def cached_request_ids(self) -> set[str]:
        """Requests holding a KV cache here, being prefilled, or about to continue from a
        prompt cache entry."""
        return set(self._requests) | self._scheduler.queued_request_ids() | set(self._forks)

    async def close(self) -> None:
        self._scheduler.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
