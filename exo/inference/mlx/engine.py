"""The MLX InferenceEngine: a ShardedModel in MLX plus one KV cache per request.

Environment (install with ``pip install -e .[mlx]``): Metal on Apple silicon; on Linux the
``mlx[cpu]`` wheel, which this package speeds up with the system OpenBLAS (see
``exo.inference.mlx``). Everything runs in float32, on MLX's default device.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import exo.inference.mlx as exo_mlx

exo_mlx.preload_blas()  # OpenBLAS before mlx.core on Linux (unless the launcher chose first)
import mlx.core as mx  # noqa: E402

from exo.inference.engine_common import ShardedModelEngine
from exo.inference.inference_engine import ENGINE_SUPPORT
from exo.inference.mlx.model import ShardedModel
from exo.inference.shard import Shard
from exo.models.architectures import ModelArgs

logger = logging.getLogger(__name__)

# MLX's default stream and its caches are per process; one thread runs every MLX call.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-engine")


class MLXInferenceEngine(ShardedModelEngine):
    """Runs a shard of a llama, mistral or qwen2 model with MLX, in float32 (see
    ``exo.inference.mlx.model``); ``unsupported_reason`` says why it cannot run another.

    Args:
        max_requests: most requests holding a KV cache at once; the least recently used is
            evicted beyond it.
        request_ttl: seconds after which an idle request's KV cache is freed.
    """

    name = "mlx"
    executor = _EXECUTOR
    supported_architectures = ENGINE_SUPPORT["mlx"][0]

    def _describe(self) -> str:
        blas = f", BLAS {exo_mlx.blas_library}" if exo_mlx.blas_library else ""
        return f"mlx {mx.__version__} {mx.default_device()}{blas}"

    def _build_model(self, args: ModelArgs, shard: Shard) -> ShardedModel:
        return ShardedModel(args, shard)
