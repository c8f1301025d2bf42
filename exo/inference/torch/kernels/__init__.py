"""Native CPU kernels of the torch engine, compiled on this machine at first use.

``gguf_blocks.cpp`` multiplies float32 activations by weights kept in the GGUF's own blocks
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, and unquantized F32, F16, BF16), runs a decode
step's attention for a whole batch (optionally over a sliding window), and a whole shard's
decode step (every layer of exo's transformer block: norms, q/k norms, RoPE, attention, SwiGLU
or GeGLU) in one call, registered as the torch operators ``torch.ops.exo_gguf.{pack, linear,
dequantize_rows, dequantize_t, decode_attention, decode_layers, block_format}`` (see the
file's header for the formats); on a CPU with Intel AMX, products of ``amx_rows()`` rows or more
(batched decode steps, prefill chunks; 8 by default, 0 where the path is missing,
``set_amx_rows(n)`` to change, 0 to turn it off) run on the tile unit in bfloat16 with each
activation split into two parts, within the float32 path's error bound; ``linear`` and
``decode_layers`` take ``allow_amx=False`` to stay on the float32 path, whose rows are each
computed exactly as alone whatever the number of rows (batch invariance).
The kernels run on their own worker threads (``set_threads``; one per CPU the process may use,
its affinity, when loaded) that spin between calls only while some forward pass holds
``set_spin(True)`` (each paired with a ``set_spin(False)``). It is built with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; ``-O3 -march=native
-ffp-contract=fast -fopenmp``, sharing torch's own libgomp) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), once per machine: about
40 s on 2 cores (eleven weight types), later loads take milliseconds. The build directory's
name carries a hash of the source and of the CPU's instruction-set flags, so a cache shared by
different machines never hands one a binary built for another.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

from exo.topology.device_capabilities import usable_cpus

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_blocks.cpp")
#: The test-only emulation of the AVX-512 and AMX intrinsics (``load_emulated_kernels``).
EMULATION = Path(__file__).with_name("avx512_emulation.h")

_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_flags() -> str:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them (``platform.processor()``
    elsewhere)."""
    return _cpu_flags()


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_name(tag: str) -> str:
    sources = SOURCE.read_bytes() + EMULATION.read_bytes()
    digest = hashlib.sha256(sources + _cpu_flags().encode() + platform.machine().encode()).hexdigest()[:12]
    return f"exo_gguf{tag}_{digest}"


def _build(tag: str = "", defines: tuple[str, ...] = ()) -> None:
    """Compile (or find in the cache) and load the kernels; raises what the build raises."""
    import torch  # noqa: F401  (the operators register into torch's library)
    from torch.utils import cpp_extension

    bindir = os.path.dirname(sys.executable)  # ninja from the virtualenv works without activating it
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    cpp_extension.load(name=_build_name(tag), sources=[str(SOURCE)], is_python_module=False,
                       extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", *(f"-D{d}" for d in defines)],
                       extra_ldflags=["-fopenmp"], verbose=False)


def gguf_kernels_error() -> str | None:
    """Build (first call only) and load the GGUF block kernels as ``torch.ops.exo_gguf``.

    Returns None when they are ready, else why not (no compiler, no ninja, a failed build; the
    reason is also logged once). Thread-safe; the result is cached for the process.
    """
    with _lock:
        if "error" in _state:
            return _state["error"]  # type: ignore[return-value]
        t0 = time.perf_counter()
        try:
            import torch

            _build()
            torch.ops.exo_gguf.set_threads(usable_cpus())  # one per CPU this process may use (its affinity)
            error = None
            logger.info("GGUF block kernels ready in %.1f s", time.perf_counter() - t0)
        except Exception as e:  # no compiler / ninja, or a build error: the caller falls back
            lines = str(e).strip().splitlines()
            error = f"{type(e).__name__}: {lines[-1] if lines else ''}"
            logger.warning("GGUF block kernels unavailable (%s)", error)
        _state["error"] = error
        return error


def load_portable_kernels():
    """The same kernels built without the AVX-512 intrinsics (the plain loops every other CPU
    runs), as ``torch.ops.exo_gguf_portable``, for tests and benchmarks on an AVX-512 machine.

    Raises:
        RuntimeError, OSError, subprocess.CalledProcessError: the build failed.
    """
    return _load_variant("portable", "EXO_GGUF_PORTABLE")


def load_emulated_kernels():
    """The AVX-512 and AMX code paths with their intrinsics emulated in plain C++ (slow; any
    x86-64 CPU), as ``torch.ops.exo_gguf_emulated``, so that tests cover those paths on a CPU
    without them. The AMX path is on for every product of ``amx_rows()`` (8) rows or more.

    Raises:
        RuntimeError, OSError, subprocess.CalledProcessError: the build failed.
    """
    return _load_variant("emulated", "EXO_GGUF_EMULATE_AVX512")


def _load_variant(variant: str, define: str):
    """Build (once per process) the kernels with ``-D{define}`` as ``torch.ops.exo_gguf_{variant}``.

    Raises:
        RuntimeError, OSError, subprocess.CalledProcessError: the build failed.
    """
    import torch

    namespace = f"exo_gguf_{variant}"
    with _lock:
        if variant not in _state:
            _build(f"_{variant}", (define, f"EXO_GGUF_NAMESPACE={namespace}"))
            getattr(torch.ops, namespace).set_threads(usable_cpus())
            _state[variant] = True
    return getattr(torch.ops, namespace)
