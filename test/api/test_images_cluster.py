"""An image request reaching a node that cannot hold the image model is drawn by the node that
can, over the ring's stream, with its progress flowing back: two real dummy-engine nodes on
127.0.0.1 (the origin knows the holder from a manual peer list; the holder never discovered the
origin and answers to the address the request carries), real gRPC, real diffusers."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest
from helpers import SESSION_TAG, loopback_config, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_request_to_a_node_without_the_model_is_drawn_by_its_holder(tiny_sd_pipeline, tmp_path):
    from exo.orchestration.launcher import start_node

    big, small = 8 * 2**30, 2**20  # the pipeline's 6.5 MB fits the holder only
    holder = await start_node(loopback_config(node_id=f"img-holder-{SESSION_TAG}", discovery_module="none",
                                              inference_engine="dummy", memory=big, default_model="", image_threads=1))
    origin = None
    try:
        peers = tmp_path / "peers.json"
        peers.write_text(json.dumps({"peers": {holder.node.id: {
            "address": "127.0.0.1", "port": holder.server.port,
            "device_capabilities": {"model": "test", "chip": "cpu", "memory": big}}}}))
        origin = await start_node(loopback_config(node_id=f"img-origin-{SESSION_TAG}", discovery_module="manual",
                                                  discovery_config_path=str(peers), inference_engine="dummy",
                                                  memory=small, default_model="", image_threads=1))
        card = await origin.node.model_card(str(tiny_sd_pipeline))
        await wait_for(lambda: holder.node.id in origin.node.topology.nodes, timeout=20)
        assert origin.node.place_image_model(card).node_id == holder.node.id
        body = {"model": str(tiny_sd_pipeline), "prompt": "a lighthouse", "size": "32x32", "seed": 11,
                "num_inference_steps": 2, "guidance_scale": 1.0, "response_format": "b64_json"}
        url = f"{origin.api_base_url}/v1/images/generations"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={**body, "stream": True}) as r:
                assert r.status == 200
                events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: ")]
            async with s.post(f"{holder.api_base_url}/v1/images/generations", json=body) as r:
                direct = await r.json()
        assert [e["type"].rsplit(".", 1)[1] for e in events] == ["progress", "progress", "completed"]
        assert base64.b64decode(events[-1]["b64_json"]) == base64.b64decode(direct["data"][0]["b64_json"])
        assert holder.node.model_state(str(tiny_sd_pipeline)) == "ready"
        assert origin.node.model_state(str(tiny_sd_pipeline)) != "ready"  # the origin never loaded it
        assert not origin.node._images._origins  # nothing left behind on either side
        await wait_for(lambda: not holder.node._images._jobs, timeout=10)
    finally:
        for running in (origin, holder):
            if running is not None:
                await running.stop()
