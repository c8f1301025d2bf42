"""The MLX engine (``pip install -e .[mlx]``): Metal on Apple silicon, ``mlx[cpu]`` on Linux.

On Linux, the ``mlx[cpu]`` wheel (0.32) links a bundled reference BLAS, ~45-75x slower than
OpenBLAS for the matrix products of a transformer. ``preload_blas`` loads the system OpenBLAS
(Debian: ``apt-get install libopenblas0-pthread``) into the process's global symbol scope, so
that ``mlx.core``, loaded afterwards, binds ``cblas_sgemm`` to it; this package's modules call
it before they import ``mlx.core``, and the launcher calls it first with the setting
``engine.mlx_blas`` (env ``EXO_MLX_BLAS``): a library path, or "none" to keep mlx's own. That
only works when nothing imported ``mlx.core`` before; otherwise (or without OpenBLAS) a warning
says so. The same effect from outside: ``LD_PRELOAD=libopenblas.so.0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

blas_library: str | None = None  # the BLAS loaded for mlx, when one was
_preloaded = False


def preload_blas(choice: str | None = None) -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL before mlx.core (Linux only), once per process: the first
    call decides, later ones return its result.

    Args:
        choice: a library name or path, "none" for no preload, or None/"" for the system OpenBLAS.

    Returns:
        the library loaded (also in ``blas_library``), or None.
    """
    global blas_library, _preloaded
    if not _preloaded:
        _preloaded = True
        blas_library = _preload_blas(choice or "")
    return blas_library


def _preload_blas(choice: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    if choice.lower() == "none":
        return None
    if "mlx.core" in sys.modules:
        logger.warning("mlx.core was imported before exo.inference.mlx: it keeps its slow bundled BLAS")
        return None
    name = choice or ctypes.util.find_library("openblas")
    if not name:
        logger.warning("no OpenBLAS found: mlx will use its bundled reference BLAS, ~50x slower "
                       "(apt-get install libopenblas0-pthread)")
        return None
    try:
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    except OSError as e:
        logger.warning("could not load %s for mlx: %s", name, e)
        return None
    return name

