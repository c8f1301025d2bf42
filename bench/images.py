"""Image generation on the cluster: seconds per image and per denoising step for the tiny
random-weight Stable Diffusion pipeline of the tests (``test/tiny_diffusion.py``) at two sizes,
asked of the node that holds it and of a node that forwards to it over the ring.

``python -m bench.images [--runs 3] [--steps 10] [--threads 1]``. Two nodes in this process on
127.0.0.1 (dummy text engine; the holder has the memory, the other too little, so it forwards);
requests stream their progress over HTTP and every step's arrival time is taken at the client.
On a machine with a CUDA GPU the pipeline runs there (float16); this prints which device it used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Table, fmt, median

SIZES = (32, 64)


async def _one(session, url: str, size: int, steps: int, seed: int) -> tuple[float, list[float]]:
    """(seconds for the image, seconds between consecutive step events)."""
    body = {"model": _one.model, "prompt": "a lighthouse at dusk", "size": f"{size}x{size}", "seed": seed,
            "num_inference_steps": steps, "guidance_scale": 7.5, "response_format": "b64_json", "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: ") and b".progress" in line[:80]:
                stamps.append(time.perf_counter())
    total = time.perf_counter() - t0
    return total, [b - a for a, b in zip(stamps, stamps[1:])]


async def measure(runs: int, steps: int, threads: int) -> tuple[dict, str]:
    import aiohttp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
    from tiny_diffusion import build_tiny_pipeline

    from exo.config import load_settings
    from exo.inference.diffusion.runner import default_device
    from exo.orchestration.launcher import start_node

    tmp = Path(tempfile.mkdtemp(prefix="exo-bench-images-"))
    _one.model = str(build_tiny_pipeline(tmp))
    base = {"node.host": "127.0.0.1", "node.interfaces": ["127.0.0.1"], "server.host": "127.0.0.1", "server.port": 0,
            "model.inference_engine": "dummy", "model.default": "", "model.image_threads": threads,
            "node.health_check_interval": 0.5}
    holder = await start_node(load_settings({**base, "node.id": "bench-img-holder", "node.discovery_module": "none",
                                             "node.memory": 8 << 30}, environ={}))
    peers = tmp / "peers.json"
    peers.write_text(json.dumps({"peers": {"bench-img-holder": {"address": "127.0.0.1", "port": holder.server.port,
                                                                "device_capabilities": {"model": "bench", "chip": "cpu",
                                                                                        "memory": 8 << 30}}}}))
    origin = await start_node(load_settings({**base, "node.id": "bench-img-origin", "node.discovery_module": "manual",
                                             "node.discovery_config_path": str(peers), "node.memory": 1 << 20},
                                            environ={}))
    results: dict = {}
    try:
        await origin.discovery.discover_peers(1, timeout=30)
        await origin.node.update_topology()
        assert "bench-img-holder" in origin.node.topology.nodes, "the forwarding node did not find the holder"
        async with aiohttp.ClientSession() as s:
            for name, running in (("one node (holder)", holder), ("through a forwarding node", origin)):
                url = f"{running.api_base_url}/v1/images/generations"
                for size in SIZES:
                    await _one(s, url, size, steps, 0)  # warm-up: loads the pipeline
                    totals, gaps = [], []
                    for i in range(runs):
                        total, g = await _one(s, url, size, steps, i + 1)
                        totals.append(total)
                        gaps += g
                    results[(name, size)] = (median(totals), median(gaps))
    finally:
        await origin.stop()
        await holder.stop()
    return results, default_device()


def table(results: dict, steps: int, device: str, threads: int) -> Table:
    rows = []
    for (name, size), (per_image, per_step) in results.items():
        one = results[("one node (holder)", size)][0]
        rows.append([name, f"{size}x{size}", fmt(per_image, 3), fmt(per_step * 1000, 1), f"{per_image / one:.2f}x"])
    return Table(f"Image generation, tiny random-weight Stable Diffusion pipeline ({steps} steps, guidance 7.5, "
                 f"device {device}, {threads} torch thread(s))",
                 ["asked of", "size", "s per image", "ms per denoising step", "vs one node"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import os

    load = os.getloadavg()
    results, device = asyncio.run(measure(args.runs, args.steps, args.threads))
    t = table(results, args.steps, device, args.threads)
    print(t.text())
    print(f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
