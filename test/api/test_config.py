"""Settings: config.yaml's values take effect (in a running node), a flag given on the command
line overrides one, environment variables sit between the two, bad files are named errors, and
logging writes rotating files split by level."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from exo.config import ConfigError, Settings, load_config, load_settings, parse_config, setup_logging
from exo.main import main, parse_command_line

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def resolve(argv: list[str], environ: dict | None = None) -> Settings:
    """What ``exo.main.main`` does before starting the node: the settings."""
    return parse_command_line(argv, environ or {})[1]


async def test_example_file_is_valid_and_documents_the_defaults():
    cfg = load_config(REPO / "config.example.yaml")
    assert cfg == Settings()


async def test_example_file_lists_every_field_of_the_schema():
    """config.example.yaml names every field of every section (recursively), and nothing else."""
    import yaml
    from pydantic import BaseModel

    def fields(model: type[BaseModel], prefix: str = "") -> set[str]:
        out = set()
        for name, info in model.model_fields.items():
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out |= fields(sub, f"{prefix}{name}.")
            else:
                out.add(prefix + name)
        return out

    def keys(data: dict, prefix: str = "") -> set[str]:
        out = set()
        for name, value in data.items():
            if isinstance(value, dict) and value and prefix == "":
                out |= keys(value, f"{name}.")
            else:
                out.add(prefix + name)
        return out

    data = yaml.safe_load((REPO / "config.example.yaml").read_text())
    assert keys(data) == fields(Settings)


async def test_file_values_take_effect_and_flags_override(tmp_path):
    path = write(tmp_path, """
server: {port: 8123, response_timeout: 5}
node: {id: from-file, discovery_module: none, interfaces: [127.0.0.1, lo]}
model: {default: from-file-model}
generation: {temperature: 0.3, max_tokens: 7}
auth: {api_keys: [k1]}
rate_limit: {requests_per_minute: 30}
cors: {allow_origin: "http://ui.example"}
""")
    cfg = resolve(["--config", str(path), "--response-timeout", "30", "--default-model", "smollm2-135m"])
    assert cfg.server.port == 8123 and cfg.node.id == "from-file" and cfg.node.discovery_module == "none"
    assert cfg.node.interfaces == ["127.0.0.1", "lo"]
    assert cfg.server.response_timeout == 30  # the flag beats the file's 5
    assert cfg.model.default == "smollm2-135m"
    opts = cfg.api_options()
    assert opts["auth"].api_keys == ["k1"] and opts["rate_limit"].requests_per_minute == 30
    assert opts["defaults"].temperature == 0.3 and opts["defaults"].max_tokens == 7
    assert opts["cors_allow_origin"] == "http://ui.example"
    # a flag given with its default value still overrides the file
    cfg = resolve(["--config", str(path), "--chatgpt-api-port", "52415"])
    assert cfg.server.port == 52415
    # no flag: the file; no file: the defaults
    cfg = resolve(["--config", str(path)])
    assert cfg.server.port == 8123 and cfg.server.response_timeout == 5
    cfg = resolve([])
    assert cfg.server.port == 52415 and cfg == Settings()


async def test_batch_invariant_from_the_file_or_the_flag_reaches_the_torch_engine(tmp_path):
    from exo.inference.torch.engine import TorchInferenceEngine

    path = write(tmp_path, "engine: {batch_invariant: false}\n")
    assert resolve([]).engine.batch_invariant is True  # the default
    assert resolve(["--config", str(path)]).engine.batch_invariant is False
    assert resolve(["--config", str(path), "--batch-invariant"]).engine.batch_invariant is True
    assert resolve(["--no-batch-invariant"]).engine.batch_invariant is False
    assert resolve(["--no-batch-invariant"]).engine.constructor_options("torch")["batch_invariant"] is False
    assert TorchInferenceEngine(device="cpu").batch_invariant is True
    assert TorchInferenceEngine(device="cpu", batch_invariant=False).batch_invariant is False


async def test_environment_sits_between_flags_and_file(tmp_path):
    path = write(tmp_path, "node: {interfaces: all}\nlogging: {level: warning}\nauth: {api_keys: [file-key]}\n")
    cfg = resolve([], environ={"EXO_CONFIG": str(path), "EXO_INTERFACES": "127.0.0.1", "EXO_API_KEYS": "a, b"})
    assert cfg.auth.api_keys == ["a", "b"]  # EXO_API_KEYS replaces the file's keys
    assert cfg.node.interfaces == ["127.0.0.1"]  # EXO_INTERFACES beats the file's "all"
    assert cfg.logging.level == "WARNING"  # from the file (EXO_LOG_LEVEL unset)
    cfg = resolve(["--log-level", "debug"], environ={"EXO_CONFIG": str(path), "EXO_LOG_LEVEL": "error"})
    assert cfg.logging.level == "DEBUG" and cfg.auth.api_keys == ["file-key"]  # the flag beats the variable
    cfg = resolve(["--interfaces", "lo"], environ={"EXO_INTERFACES": "127.0.0.1", "EXO_LOG_LEVEL": "",
                                                   "EXO_TORCH_WEIGHTS": "dense", "EXO_MEMORY_BYTES": "1000"})
    assert cfg.node.interfaces == ["lo"] and cfg.logging.level == "INFO"  # an empty variable is unset
    assert cfg.engine.weights == "dense" and cfg.node.memory == 1000
    with pytest.raises(ConfigError, match="EXO_MEMORY_BYTES"):
        resolve([], environ={"EXO_MEMORY_BYTES": "8GB"})
    with pytest.raises(ConfigError, match="logging.level"):
        resolve(["--log-level", "loud"])
    # a program's own values (the tests', the benchmarks') go through the same function
    assert load_settings({"node.port": 7, "auth": {"api_keys": ["k"]}}).node.port == 7


async def test_bad_files_are_named_errors(tmp_path):
    cases = {
        "auth: {api_key: [x]}\n": "auth.api_key: unknown field",
        "server: {port: 70000}\n": "server.port",
        "rate_limit: {requests_per_minute: -1}\n": "rate_limit.requests_per_minute",
        "logging: {level: LOUD}\n": "logging.level",
        "gpu: {}\n": "gpu: unknown field",
        "- a\n- b\n": "top level must be a mapping",
        "server: [\n": "not valid YAML",
    }
    for text, needle in cases.items():
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
            load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    assert parse_config(None) == Settings()  # an empty file
    assert parse_config({"auth": None}) == Settings()  # an empty section
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2  # the CLI refuses to start


async def test_a_node_started_from_a_config_file(tmp_path):
    """The file's keys, generation default and rate limit are live; the flag picks the model."""
    from exo.orchestration.launcher import start_node

    path = write(tmp_path, """
server: {host: 127.0.0.1, port: 0}
node: {host: 127.0.0.1, interfaces: [127.0.0.1], discovery_module: none}
model: {default: no-such-model, inference_engine: dummy}
generation: {max_tokens: 3}
auth: {api_keys: [file-secret]}
rate_limit: {requests_per_minute: 1, burst: 3}
""")
    cfg = resolve(["--config", str(path), "--default-model", "smollm2-135m"])
    running = await start_node(cfg)
    try:
        url = f"{running.api_base_url}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}]}  # no model: the default (from the flag)
        key = {"Authorization": "Bearer file-secret"}
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body) as resp:
                assert resp.status == 401
            async with s.post(url, json=body, headers=key) as resp:
                assert resp.status == 200, await resp.text()
                r = await resp.json()
            assert r["model"] == "smollm2-135m" and r["usage"]["completion_tokens"] == 3  # generation.max_tokens
            statuses = []
            for _ in range(3):
                async with s.get(f"{running.api_base_url}/v1/models", headers=key) as resp:
                    statuses.append(resp.status)
            assert statuses == [200, 200, 429]  # burst 3: the chat above took the first token
    finally:
        await running.stop()


async def test_logging_to_rotating_files_split_by_level(tmp_path):
    from exo.config import LoggingConfig

    logger = logging.getLogger("exo-test-config-logging")
    logger.propagate = False
    cfg = LoggingConfig(level="DEBUG", dir=tmp_path / "logs", max_bytes=1024, backup_count=2)
    try:
        setup_logging(cfg, root=logger)
        handlers = setup_logging(cfg, root=logger)  # twice: no duplicated handlers
        assert len(logger.handlers) == len(handlers) == 5  # console + 4 files
        logger.debug("a debug line")
        logger.info("an info line")
        logger.warning("a warning line")
        logger.error("an error line")
        logger.critical("a critical line")
        for h in logger.handlers:
            h.flush()
        d = tmp_path / "logs"
        assert (d / "exo.debug.log").read_text().count("\n") == 1 and "a debug line" in (d / "exo.debug.log").read_text()
        assert "an info line" in (d / "exo.info.log").read_text() and "warning" not in (d / "exo.info.log").read_text()
        assert "a warning line" in (d / "exo.warning.log").read_text()
        errors = (d / "exo.error.log").read_text()
        assert "an error line" in errors and "a critical line" in errors and "info" not in errors
        for i in range(100):
            logger.info("filler line %d to make the info file rotate", i)
        assert (d / "exo.info.log.1").exists() and not (d / "exo.info.log.3").exists()
        assert (d / "exo.info.log").stat().st_size <= 1024
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()


async def test_nothing_below_the_command_line_reads_the_environment():
    """Settings reach the code from ``exo.main``; no other module of exo reads ``os.environ``
    except for what is not exo's configuration (listed with the reason)."""
    import re

    allowed = {
        "exo/main.py": "builds the settings from the environment",
        "exo/models/hub/downloader.py": "huggingface_hub's own HF_* variables (its cache, endpoint, token, offline mode)",
        "exo/inference/torch/__init__.py": "sets GOMP_SPINCOUNT for OpenMP before torch loads",
        "exo/inference/torch/kernels/__init__.py": "puts the virtualenv's ninja on PATH for the kernel build",
    }
    readers = set()
    for path in sorted((REPO / "exo").rglob("*.py")):
        if re.search(r"\bos\.(environ|getenv)\b|\bgetenv\(", path.read_text(encoding="utf-8")):
            readers.add(path.relative_to(REPO).as_posix())
    assert readers <= set(allowed), sorted(readers - set(allowed))
