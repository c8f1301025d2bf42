"""exo.models.hub against a hub server on 127.0.0.1 (test/hub_server.py): names, resolving,
downloading by shard (safetensors files, GGUF byte ranges), resuming, progress, offline mode
and the errors users see. Nothing here reaches huggingface.co: every test points HF_ENDPOINT
at the local server and HF_HOME at a temporary directory."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer, make_repo
from tiny_models import build_hf_model, write_gguf

from exo.models.hub import DownloadError, DownloadProgress, HubDownloader, HubRef, parse_hub_name
from exo.models.weights import open_weights

ST_REPO = "org/tiny-llama"
GGUF_REPO = "org/tiny-llama-GGUF"
SPLIT_REPO = "org/tiny-llama-split-GGUF"
TIED_REPO = "org/tiny-qwen2-GGUF"
GGUF_FILE = "tiny-llama-Q4_K_M.gguf"
PROBE = 4096  # bytes of a GGUF fetched first for its header (the tiny files are ~800 KB)


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> Path:
    """A directory of hub repos: a safetensors llama in 9 shards with an index, the same model
    as GGUF files (Q4_K_M, Q8_0 and an mmproj decoy by name), as a 3-way split GGUF, and a
    tied-embedding qwen2 GGUF."""
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("hub")
    llama = build_hf_model("llama", base / "llama")
    root = base / "repos"
    st = root / ST_REPO
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(st, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, st / name)
    assert (st / "model.safetensors.index.json").is_file() and len(list(st.glob("*.safetensors"))) >= 5
    for d in ("gguf", "split", "qwen"):
        (base / d).mkdir()
    gguf = write_gguf(llama, base / "gguf" / GGUF_FILE)
    make_repo(root, GGUF_REPO, {GGUF_FILE: gguf, "tiny-llama-Q8_0.gguf": gguf, "mmproj-tiny-Q4_K_M.gguf": b"GGUF-decoy",
                                "README.md": "tiny"})
    first = write_gguf(llama, base / "split" / "tiny-llama-Q8_0.gguf", split=3)
    make_repo(root, SPLIT_REPO, {p.name: p for p in sorted(first.parent.glob("*.gguf"))})
    qwen = build_hf_model("qwen2", base / "qwen2")
    make_repo(root, TIED_REPO, {"tiny-qwen2-F32.gguf": write_gguf(qwen, base / "qwen" / "tiny-qwen2-F32.gguf")})
    return root


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """The hub server of ``repos``, HF_ENDPOINT pointing at it, HF_HOME a fresh directory, online."""
    import huggingface_hub.constants

    server = HubServer(repos)
    url = server.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import (conftest sets 1)
    try:
        yield server
    finally:
        server.stop()


def downloader(**kwargs) -> HubDownloader:
    """A downloader configured from the environment, with its own progress registry."""
    kwargs.setdefault("progress", DownloadProgress())
    kwargs.setdefault("header_probe", PROBE)
    return HubDownloader(**kwargs)


def go_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_same_shard(local: Path, original: Path, start: int, end: int) -> None:
    got, want = open_weights(local).load_shard(start, end), open_weights(original).load_shard(start, end)
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def no_overlap(ranges: list[tuple[int, int]]) -> bool:
    spans = sorted(ranges)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name, ref", [
    ("org/name", HubRef("org/name")),
    ("Org-1/Name_2.5", HubRef("Org-1/Name_2.5")),
    ("org/name:latest", HubRef("org/name")),
    ("org/name-GGUF:model-Q4_K_M.gguf", HubRef("org/name-GGUF", filename="model-Q4_K_M.gguf")),
    ("org/name-GGUF:Q4_K_M/model-00001-of-00002.gguf", HubRef("org/name-GGUF", filename="Q4_K_M/model-00001-of-00002.gguf")),
    ("org/name:Q4_K_M", HubRef("org/name", quant="Q4_K_M")),
    ("hf.co/org/name:Q4_K_M", HubRef("org/name", quant="Q4_K_M")),
    ("huggingface.co/org/name:q4_k_m", HubRef("org/name", quant="Q4_K_M")),
    ("https://huggingface.co/org/name", HubRef("org/name")),
    ("hf.co/unsloth/Model-GGUF:UD-Q4_K_XL", HubRef("unsloth/Model-GGUF", quant="UD-Q4_K_XL")),
])
def test_hub_names(name, ref):
    assert parse_hub_name(name) == ref


@pytest.mark.parametrize("name", [
    "", "   ", "smollm2-135m", "org", "org/", "/org/name", "./x.gguf", "../models/x.gguf", "~/x.gguf",
    "a/b/c", "org/name:", "org/na me", "org/-name", "org/name-", "org--x/name", "org/na..me", "org/x.gguf",
    "org/name:Q4 K M", "org/name:../x.gguf", "org/name:a:b", "C:\\models\\x.gguf", None,
])
def test_not_hub_names(name):
    assert parse_hub_name(name) is None


def test_existing_local_paths_are_not_hub_names(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    (tmp_path / "org" / "model.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert parse_hub_name("org/model") is None
    assert parse_hub_name("org/model.Q4.gguf") is None
    assert parse_hub_name(str(tmp_path / "org" / "model")) is None
    assert parse_hub_name("org/other") == HubRef("org/other")


# ------------------------------------------------------------------------------------ resolve


def test_resolve_picks_the_file(hub):
    d = downloader()
    st = d.resolve(ST_REPO)
    assert st.kind == "safetensors" and len(st.files) >= 5 and all(f.endswith(".safetensors") for f in st.files)
    assert st.remote["config.json"].size > 0 and st.remote[st.files[0]].sha256  # LFS sha256 from the listing
    assert len(st.commit) == 40 and st.snapshot.parent.parent.name == "models--org--tiny-llama"

    assert d.resolve(GGUF_REPO).files == (GGUF_FILE,)  # the default quant (not the mmproj)
    assert d.resolve(f"hf.co/{GGUF_REPO}:q8_0").files == ("tiny-llama-Q8_0.gguf",)
    assert d.resolve(f"{GGUF_REPO}:tiny-llama-Q8_0.gguf").files == ("tiny-llama-Q8_0.gguf",)
    split = d.resolve(f"{SPLIT_REPO}:tiny-llama-Q8_0-00002-of-00003.gguf")
    assert split.files == tuple(f"tiny-llama-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3))
    assert d.resolve(f"{SPLIT_REPO}:Q8_0").files == split.files
    assert d.resolve(SPLIT_REPO).files == split.files  # no Q4_K_M: the first GGUF, all its splits
    with pytest.raises(DownloadError, match=r"no GGUF file for quant IQ2_XS.*tiny-llama-Q4_K_M\.gguf"):
        d.resolve(f"{GGUF_REPO}:IQ2_XS")
    with pytest.raises(DownloadError, match=r"org/tiny-llama-GGUF has no file nope\.gguf"):
        d.resolve(f"{GGUF_REPO}:nope.gguf")
    with pytest.raises(DownloadError, match="not a Hugging Face model name"):
        d.resolve("./local.gguf")
    assert not hub.files_requested()  # resolving lists; it downloads nothing


def test_the_server_answers_list_repo_tree(hub):
    from huggingface_hub import HfApi

    files = {f.path: f for f in HfApi(endpoint=hub.url).list_repo_tree(GGUF_REPO)}
    assert files[GGUF_FILE].size == (hub.root / GGUF_REPO / GGUF_FILE).stat().st_size and files[GGUF_FILE].lfs
    assert files["README.md"].lfs is None


# ------------------------------------------------------------------------------------ safetensors


def test_safetensors_shard_downloads_only_its_files(hub):
    d = downloader()
    model = d.resolve(ST_REPO)
    header = d.ensure_header(model)
    assert header == model.snapshot
    header_files = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "model.safetensors.index.json"}
    assert hub.files_requested() == header_files  # no weights yet
    w = open_weights(header)  # architecture and layers from the header alone
    assert w.args.n_layers == 4
    shapes = {name: t.shape for name, t in open_weights(hub.root / ST_REPO).tensor_info().items()}
    assert {name: t.shape for name, t in w.tensor_info().items()} == shapes  # from the config, files absent
    shard_files = w.files_for(w.shard_tensor_names(0, 1))
    assert 0 < len(shard_files) < len(model.files)

    path = d.ensure_shard(model, 0, 1)
    assert path == model.snapshot
    assert hub.files_requested() == header_files | shard_files
    for name in set(model.files) - shard_files:
        assert not (path / name).exists()
    for name in shard_files:  # whole files, once each
        assert hub.bytes_served(name) == (hub.root / ST_REPO / name).stat().st_size
    assert_same_shard(path, hub.root / ST_REPO, 0, 1)

    snap = d.progress.get(ST_REPO)
    sizes = sum((hub.root / ST_REPO / f).stat().st_size for f in header_files | shard_files)
    assert snap["state"] == "done" and snap["error"] is None
    assert snap["bytes_total"] == snap["bytes_done"] == sizes
    assert set(snap["files"]) == header_files | shard_files
    json.dumps(d.progress.snapshot())

    hub.reset()  # the last layers: only the files those need
    d.ensure_shard(model, 2, 3)
    assert_same_shard(path, hub.root / ST_REPO, 2, 3)
    assert hub.files_requested() == w.files_for(w.shard_tensor_names(2, 3)) - shard_files


def test_safetensors_ensure_all(hub):
    d = downloader()
    model = d.resolve(ST_REPO)
    path = d.ensure_all(model)
    for name in model.files:
        assert (path / name).read_bytes() == (hub.root / ST_REPO / name).read_bytes()
    snap = d.progress.get(ST_REPO)
    assert snap["state"] == "done" and snap["bytes_done"] == snap["bytes_total"] > sum(
        (hub.root / ST_REPO / f).stat().st_size for f in model.files)


def test_a_cut_safetensors_transfer_resumes_where_it_stopped(hub, monkeypatch):
    """huggingface_hub resumes a cut transfer itself (after 1 s), by a Range request from the
    last byte it wrote; it writes by DOWNLOAD_CHUNK_SIZE (10 MiB; 16 KiB here)."""
    import huggingface_hub.constants

    chunk = 16 << 10
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    d = downloader()
    model = d.resolve(ST_REPO)
    d.ensure_header(model)
    w = open_weights(model.snapshot)
    name = sorted(w.files_for(w.shard_tensor_names(0, 0)))[-1]
    size = (hub.root / ST_REPO / name).stat().st_size
    cut = size // 3
    hub.cut_next_transfer(after=cut, file=name)
    d.ensure_shard(model, 0, 0)
    assert (model.snapshot / name).read_bytes() == (hub.root / ST_REPO / name).read_bytes()
    written = cut // chunk * chunk
    assert hub.ranges(name) == [(0, cut), (written, size)]  # from the last byte written
    assert d.progress.get(ST_REPO)["state"] == "done"


# ------------------------------------------------------------------------------------ GGUF


def test_gguf_shard_fetches_only_its_byte_ranges(hub):
    d = downloader()
    model = d.resolve(GGUF_REPO)
    original = hub.root / GGUF_REPO / GGUF_FILE
    size = original.stat().st_size

    path = d.ensure_header(model)
    assert path == model.partial_dir / GGUF_FILE and path.stat().st_size == size  # sparse, full size
    w = open_weights(path)
    assert w.args.n_layers == 4
    header_bytes = hub.bytes_served(GGUF_FILE)
    assert header_bytes < 20_000  # header, norms, rope factors: no layer, no embedding
    assert hub.files_requested() == {GGUF_FILE}

    first = w.shard_bytes(0, 1)
    d.ensure_shard(model, 0, 1)
    served = hub.bytes_served(GGUF_FILE)
    assert first <= served <= first + header_bytes  # the header's probe may have held some of the shard
    assert served < size * 0.6
    assert no_overlap(hub.ranges(GGUF_FILE))  # nothing twice
    present = json.loads(path.with_name(path.name + ".exo.json").read_text())["ranges"]
    assert sum(e - s for s, e in present) == served
    for _, s, e in w.byte_ranges(w.shard_tensor_names(0, 1)):
        assert any(a <= s and e <= b for a, b in present)
    assert_same_shard(path, original, 0, 1)
    snap = d.progress.get(GGUF_REPO)
    assert snap["state"] == "done" and snap["bytes_done"] == snap["bytes_total"] == served

    hub.reset()  # a re-partition: only the bytes still missing
    d.ensure_shard(model, 1, 3)
    again = hub.bytes_served(GGUF_FILE)
    assert again == size - served  # the rest of the file, nothing twice (F32 tensors: no padding)
    assert_same_shard(path, original, 1, 3)
    sidecar = json.loads(path.with_name(path.name + ".exo.json").read_text())
    assert sidecar["ranges"] == [[0, size]] and sidecar["verified"] and sidecar["commit"] == model.commit

    hub.reset()
    assert d.ensure_all(model) == path
    assert not hub.requests and path.read_bytes() == original.read_bytes()  # complete: it stays there


def test_gguf_split_shard(hub):
    d = downloader()
    model = d.resolve(f"hf.co/{SPLIT_REPO}:Q8_0")
    path = d.ensure_shard(model, 0, 0)
    assert path == model.partial_dir / model.files[0]
    originals = [hub.root / SPLIT_REPO / f for f in model.files]
    w = open_weights(path)
    assert len(w.gguf.paths) == 3
    by_file = {}
    for f, s, e in w.byte_ranges(w.shard_tensor_names(0, 0)):
        by_file[f] = by_file.get(f, 0) + e - s
    for i, name in enumerate(model.files):
        served = hub.bytes_served(name)
        assert by_file.get(i, 0) <= served <= by_file.get(i, 0) + 20_000  # its tensors + its header
    assert hub.bytes_served() < 0.4 * sum(p.stat().st_size for p in originals)
    assert_same_shard(path, originals[0], 0, 0)
    hub.reset()
    d.ensure_shard(model, 3, 3)
    assert_same_shard(path, originals[0], 3, 3)
    for name in model.files:
        assert no_overlap(hub.ranges(name))


def test_gguf_last_shard_of_a_tied_model_fetches_the_embedding(hub):
    d = downloader()
    model = d.resolve(TIED_REPO)
    path = d.ensure_shard(model, 2, 3)
    original = hub.root / TIED_REPO / model.files[0]
    w = open_weights(original)
    assert w.args.tie_word_embeddings
    embd, blk1 = w.gguf.tensors["token_embd.weight"], w.gguf.tensors["blk.1.ffn_down.weight"]
    present = json.loads(path.with_name(path.name + ".exo.json").read_text())["ranges"]
    assert any(s <= embd.offset and embd.end <= e for s, e in present)  # the tied head's weights
    assert not any(s < blk1.end and blk1.offset < e for s, e in present)  # not the first layers
    got = open_weights(path).load_shard(2, 3)
    assert np.array_equal(got["output"], w.load_shard(0, 0)["embed"])
    assert_same_shard(path, original, 2, 3)


def test_a_cut_gguf_transfer_resumes_from_the_last_byte_written(hub):
    d = downloader(resumes=0)
    model = d.resolve(GGUF_REPO)
    original = hub.root / GGUF_REPO / GGUF_FILE
    d.ensure_header(model)
    hub.reset()
    hub.cut_next_transfer(after=100_000)
    with pytest.raises(DownloadError, match=r"transfer of org/tiny-llama-GGUF/tiny-llama-Q4_K_M\.gguf .* failed"):
        d.ensure_shard(model, 0, 1)
    snap = d.progress.get(GGUF_REPO)
    assert snap["state"] == "error" and "failed" in snap["error"]
    assert 100_000 <= snap["bytes_done"] < snap["bytes_total"]
    (start, cut), = hub.ranges(GGUF_FILE)
    assert cut - start == 100_000
    sidecar = json.loads((model.partial_dir / (GGUF_FILE + ".exo.json")).read_text())
    assert any(s <= start and cut <= e for s, e in sidecar["ranges"])  # the bytes that arrived are kept

    d.ensure_shard(model, 0, 1)  # a retry fetches the rest only
    ranges = hub.ranges(GGUF_FILE)
    assert ranges[1][0] == cut and no_overlap(ranges)
    assert_same_shard(model.local_path, original, 0, 1)
    assert d.progress.get(GGUF_REPO)["state"] == "done"

    # by default a cut transfer that made progress resumes within the call
    d2 = downloader()
    hub.reset()
    hub.cut_next_transfer(after=50_000)
    d2.ensure_shard(model, 2, 3)
    ranges = hub.ranges(GGUF_FILE)
    assert len(ranges) == 2 and ranges[0][1] == ranges[1][0] and no_overlap(ranges)
    assert model.local_path.read_bytes() == original.read_bytes()


# ------------------------------------------------------------------------------------ offline


def test_offline_loads_from_the_cache_without_a_request(hub, monkeypatch):
    online = downloader()
    st, gg = online.resolve(ST_REPO), online.resolve(GGUF_REPO)
    online.ensure_shard(st, 0, 1)
    online.ensure_shard(gg, 0, 1)
    hub.reset()

    go_offline(monkeypatch)
    d = downloader()
    assert d.offline
    for repo, model in ((ST_REPO, st), (GGUF_REPO, gg)):
        cached = d.resolve(repo)
        assert (cached.commit, cached.kind, cached.files) == (model.commit, model.kind, model.files)
        path = d.ensure_shard(cached, 0, 1)
        assert_same_shard(path, hub.root / repo / (GGUF_FILE if cached.kind == "gguf" else ""), 0, 1)
        assert d.progress.get(repo)["state"] == "done"
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"offline .*not in the cache.*model-0000\d-of-00009\.safetensors"):
        d.ensure_shard(d.resolve(ST_REPO), 3, 3)
    with pytest.raises(DownloadError, match=r"offline .*bytes of org/tiny-llama-GGUF/tiny-llama-Q4_K_M\.gguf"):
        d.ensure_shard(d.resolve(GGUF_REPO), 3, 3)
    assert time.monotonic() - start < 2
    assert d.progress.get(GGUF_REPO)["state"] == "error"
    assert not hub.requests


def test_offline_with_nothing_cached_fails_fast(hub, monkeypatch):
    go_offline(monkeypatch)
    d = downloader()
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"org/tiny-llama: offline .* not in the Hugging Face cache .*refs/main"):
        d.resolve(ST_REPO)
    with pytest.raises(DownloadError, match=r"offline .*refs/main and tiny-llama-Q8_0\.gguf"):
        d.resolve(f"{GGUF_REPO}:tiny-llama-Q8_0.gguf")
    assert time.monotonic() - start < 2
    assert not hub.requests


# ------------------------------------------------------------------------------------ errors


def test_endpoint_down_fails_fast(hub):
    d = downloader()
    model = d.resolve(ST_REPO)
    gguf = d.resolve(GGUF_REPO)
    hub.stop()
    for call in (lambda: d.resolve(ST_REPO), lambda: d.ensure_shard(model, 0, 1), lambda: d.ensure_header(gguf)):
        start = time.monotonic()
        with pytest.raises(DownloadError, match=rf"cannot reach the hub at {hub.url}"):
            call()
        assert time.monotonic() - start < 3
    assert d.progress.get(GGUF_REPO)["state"] == "error"


def test_missing_repo_file_and_revision(hub):
    d = downloader()
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"org/nope: repository org/nope not found on http://127\.0\.0\.1:\d+ \(HTTP 404\)"):
        d.resolve("org/nope")
    with pytest.raises(DownloadError, match=r"org/tiny-llama has no revision v9"):
        d.resolve(HubRef(ST_REPO, revision="v9"))
    model = d.resolve(GGUF_REPO)
    moved = hub.root / "moved.gguf"
    (hub.root / GGUF_REPO / GGUF_FILE).rename(moved)  # the repo changes after it was listed: a new commit
    try:
        with pytest.raises(DownloadError, match=rf"org/tiny-llama-GGUF/{GGUF_FILE}: .*no revision {model.commit}.*resolve"):
            d.ensure_header(model)
    finally:
        moved.rename(hub.root / GGUF_REPO / GGUF_FILE)
    assert time.monotonic() - start < 3


def test_private_and_gated_repos_need_hf_token(hub, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    hub.private[ST_REPO] = "hf_private_secret"
    hub.gated[GGUF_REPO] = "hf_gated_secret"
    d = downloader()
    with pytest.raises(DownloadError, match=r"org/tiny-llama is private or gated.*HTTP 401.*set HF_TOKEN"):
        d.resolve(ST_REPO)
    model = d.resolve(GGUF_REPO)  # a gated repo lists its files to anyone
    with pytest.raises(DownloadError, match=r"org/tiny-llama-GGUF is a gated repo \(HTTP 401\).*set HF_TOKEN"):
        d.ensure_header(model)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match=r"gated repo \(HTTP 403\).*the one given was refused"):
        downloader().ensure_header(model)

    monkeypatch.setenv("HF_TOKEN", "hf_private_secret")
    d = downloader()
    assert "secret" not in repr(d)
    d.ensure_shard(d.resolve(ST_REPO), 0, 0)
    monkeypatch.setenv("HF_TOKEN", "hf_gated_secret")
    d = downloader()
    d.ensure_shard(d.resolve(GGUF_REPO), 0, 0)
    sent = {r.authorization for r in hub.requests if r.kind == "resolve" and r.status in (200, 206)}
    assert sent == {"Bearer hf_private_secret", "Bearer hf_gated_secret"}
    assert "secret" not in caplog.text  # never logged


def test_lfs_files_redirected_to_another_host(hub, monkeypatch):
    """As on huggingface.co: resolve answers LFS files with a 302 to a CDN on another origin,
    which gets no Authorization header."""
    hub.cdn = True
    hub.gated[GGUF_REPO] = hub.gated[ST_REPO] = "hf_gated_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_gated_secret")
    d = downloader()
    for repo, original in ((ST_REPO, hub.root / ST_REPO), (GGUF_REPO, hub.root / GGUF_REPO / GGUF_FILE)):
        model = d.resolve(repo)
        path = d.ensure_shard(model, 0, 1)
        assert_same_shard(path, original, 0, 1)
    redirects = [r for r in hub.requests if r.kind == "redirect"]
    transfers = [r for r in hub.requests if r.kind == "resolve" and r.status in (200, 206) and r.file.endswith((".gguf", ".safetensors"))]
    assert redirects and transfers
    assert all(r.authorization == "Bearer hf_gated_secret" for r in redirects)
    assert all(r.authorization is None for r in transfers)  # not sent off the hub
    assert no_overlap(hub.ranges(GGUF_FILE))


def test_a_gguf_whose_bytes_do_not_match_its_sha256_is_fetched_again(hub):
    d = downloader()
    model = d.resolve(GGUF_REPO)
    original = hub.root / GGUF_REPO / GGUF_FILE
    path = d.ensure_shard(model, 0, 1)
    with open(path, "r+b") as f:  # a byte of the embedding goes bad on disk
        f.seek(20_000)
        byte = f.read(1)[0]
        f.seek(20_000)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(DownloadError, match=rf"{GGUF_FILE} does not match its sha256 .*discarded, try again"):
        d.ensure_shard(model, 2, 3)  # the file is complete now: checked
    assert json.loads(path.with_name(path.name + ".exo.json").read_text())["ranges"] == []
    hub.reset()
    d.ensure_all(model)
    assert path.read_bytes() == original.read_bytes() and hub.bytes_served(GGUF_FILE) == original.stat().st_size
