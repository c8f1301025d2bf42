"""The MLX engine (``pip install -e .[mlx]``): Metal on Apple silicon, ``mlx[cpu]`` on Linux.

On Linux, the ``mlx[cpu]`` wheel (0.32) links a bundled reference BLAS, ~45-75x slower than
OpenBLAS for the matrix products of a transformer. Importing this package first loads the
system OpenBLAS (Debian: ``apt-get install libopenblas0-pthread``) into the process's global
symbol scope, so that ``mlx.core``, loaded afterwards, binds ``cblas_sgemm`` to it. That only
works when nothing imported ``mlx.core`` before; otherwise (or without OpenBLAS) a warning says
so. ``EXO_MLX_BLAS=/path/libopenblas.so`` picks the library; ``EXO_MLX_BLAS=none`` disables it.
The same effect from outside: ``LD_PRELOAD=libopenblas.so.0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

blas_library: str | None = None  # the BLAS loaded for mlx, when one was


def _preload_blas() -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL before mlx.core (Linux only); return its name or None."""
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get("EXO_MLX_BLAS", "")
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


blas_library = _preload_blas()
