"""The torch engine: ``engine.TorchInferenceEngine`` running ``model.ShardedLlama``.

libgomp (torch's OpenMP runtime on Linux) keeps idle worker threads spinning for
``GOMP_SPINCOUNT`` iterations after each parallel region: 300,000 by default, ~15 ms on CPUs
whose ``pause`` instruction takes ~140 cycles. Two nodes sharing a machine then take each
other's cores after every forward pass (measured: a 2-node ring on 2 cores lost 28% of its
decode speed, 16 concurrent streams on it 80%). 10,000 iterations (well under 1 ms) still bridge
the gaps between the operations of one forward pass, so a node alone decodes as fast. libgomp
reads the variable when it loads, so it is set here, before ``torch`` is imported; a value in
the environment wins.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
