"""The ``exo`` command: start a node, or run one prompt through the cluster and print the answer."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping

from exo.config import (DEFAULT_API_PORT, DEFAULT_IDLE_TTL, DEFAULT_MAX_MODELS, DEFAULT_MODEL, DEFAULT_RESPONSE_TIMEOUT,
                        Settings)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The CLI; flag names follow the old exo where they exist.

    A flag that sets a field of ``Settings`` has that field's dotted path as its destination
    (``--chatgpt-api-port`` -> ``server.port``) and no default: only flags actually given
    appear in the namespace, so an absent flag leaves the environment's or the file's value.
    """
    p = argparse.ArgumentParser(
        prog="exo",
        description="Run a node of an exo inference cluster (default), or `exo run MODEL --prompt TEXT`.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("command", nargs="?", choices=["run", "pull"], default=None,
            help="`run`: answer --prompt with MODEL and exit; `pull`: download MODEL's weights and exit")
    p.add_argument("model_name", nargs="?", default=None,
            help="model for `run` / `pull` (default: --default-model): a catalogue id, "
                        "a .gguf path, a Hugging Face directory or repo (org/name[:FILE.gguf|:QUANT])")
    p.add_argument("--prompt", default="Who are you?", help="prompt for `run`")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens `run` generates")
    p.add_argument("--config", default=None,
            help="YAML configuration file (env EXO_CONFIG; see config.example.yaml); flags given override it")

    def setting(flag: str, dest: str, **kwargs) -> None:  # a flag that sets the field ``dest``
        if "choices" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        p.add_argument(flag, dest=dest, **kwargs)

    setting("--node-id", "node.id", help="unique id of this node (default: a random UUID)")
    setting("--node-host", "node.host",
            help="address the gRPC server binds (default: 127.0.0.1 when --interfaces is loopback-only, else 0.0.0.0)")
    setting("--node-port", "node.port", type=int, help="gRPC port (default: a free port)")
    setting("--chatgpt-api-port", "server.port", type=int,
            help=f"HTTP API and web UI port (default {DEFAULT_API_PORT})")
    setting("--api-host", "server.host", help="address the HTTP API binds (default: as --node-host)")
    setting("--discovery-module", "node.discovery_module", choices=["mdns", "manual", "none"],
            help="how peers are found: mDNS (zeroconf, default), a JSON file of peers, or none")
    setting("--discovery-config-path", "node.discovery_config_path",
            help="JSON peer list for --discovery-module manual")
    setting("--interfaces", "node.interfaces",
            help="comma list of addresses or interface names discovery may use, or 'all' "
                 "(env EXO_INTERFACES; default all). Use 127.0.0.1 to keep a node on this machine.")
    setting("--inference-engine", "model.inference_engine", choices=["torch", "tinygrad", "mlx", "dummy"],
            help="engine (default: the best one installed)")
    setting("--default-model", "model.default",
            help=f"model served when a request names none (default {DEFAULT_MODEL})")
    setting("--max-models", "model.max_models", type=int,
            help=f"models whose shards this node holds at once (default {DEFAULT_MAX_MODELS})")
    setting("--model-idle-ttl", "model.idle_ttl", type=float,
            help=f"seconds an unused model stays loaded (default {DEFAULT_IDLE_TTL:g})")
    setting("--image-threads", "model.image_threads", type=int,
            help="torch threads while this node draws images on the CPU (default: one per core)")
    setting("--batch-invariant", "engine.batch_invariant", action=argparse.BooleanOptionalAction,
            help="torch engine: a request's logits do not depend on the requests batched with it, so a seed gives "
                 "the same answer at any load (default); --no-batch-invariant lets batches take faster paths (AMX)")
    setting("--wait-for-peers", "node.wait_for_peers", type=int, help="wait for this many peers before serving")
    setting("--cluster-secret", "node.cluster_secret",
            help="cluster secret: nodes talk mutual TLS under a CA derived from it, so only nodes with the same "
                 "secret join (env EXO_CLUSTER_SECRET; at least 24 random characters; none: plaintext)")
    setting("--memory", "node.memory", type=int,
            help="bytes of memory this node offers for weights (default: detected; env EXO_MEMORY_BYTES)")
    setting("--response-timeout", "server.response_timeout", type=float,
            help=f"seconds to wait for the next token (default {DEFAULT_RESPONSE_TIMEOUT:g})")
    setting("--log-level", "logging.level", help="logging level (env EXO_LOG_LEVEL; default INFO)")
    return p


def parse_command_line(argv: list[str] | None = None,
                       environ: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The command (``command``, ``model_name``, ``prompt``, ``max_tokens``) and the settings
    built from the flags given, ``environ`` (default: this process's environment) and the file.
    ``exo run MODEL`` serves MODEL without the HTTP API.

    Raises:
        ConfigError: a bad file or value, named.
    """
    from exo.config import load_settings

    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    if args.model_name and args.command == "run":
        flags["model.default"] = args.model_name
    if args.command == "run":
        flags["server.enabled"] = False
    settings = load_settings(flags, os.environ if environ is None else environ, config_path=args.config)
    return args, settings


async def serve(settings: Settings) -> None:
    """Run a node until SIGINT/SIGTERM."""
    from exo.orchestration.launcher import start_node

    running = await start_node(settings)
    logger.info("node %s serving; API and web UI at %s/", running.node.id, running.api_base_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()


async def run_prompt(settings: Settings, prompt: str, max_tokens: int) -> int:
    """Answer ``prompt`` with the chat template of the default model (a base model without one
    continues the prompt as plain text), printing tokens as they come."""
    from exo.inference.generation import GenerationOptions
    from exo.inference.tokenizers import IncrementalDetokenizer
    from exo.orchestration.launcher import start_node

    model = settings.model.default
    running = await start_node(settings)
    try:
        node = running.node
        tok = await node.get_tokenizer(model)
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if tok.chat_template else prompt
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        options = GenerationOptions(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.eos_token_ids)
        async for result in node.generate(model, ids, options):
            for t in result.tokens:
                sys.stdout.write(detok.add(t))
            sys.stdout.flush()
        sys.stdout.write(detok.flush() + "\n")
        return 0
    finally:
        await running.stop()


def pull(model: str) -> int:
    """Download every file of ``model`` to this machine (the Hugging Face cache), with a
    progress bar on a terminal; print where it is. A model that cannot be had (unknown,
    offline with nothing cached, the hub unreachable, not a model exo can run): its reason on
    stderr and exit status 2."""
    from exo.models.hub import DownloadError
    from exo.models.sources import STORE

    try:
        path = STORE.pull(model)
    except (DownloadError, LookupError, ValueError, OSError) as e:
        sys.stderr.write(f"exo pull: {e}\n")
        return 2
    sys.stdout.write(f"{model}: {path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from exo.config import ConfigError, setup_logging

    try:
        args, settings = parse_command_line(argv)
        setup_logging(settings.logging)
    except (ConfigError, OSError) as e:
        logging.basicConfig(stream=sys.stderr)
        logger.error("%s", e)
        return 2
    try:
        if args.command == "pull":
            return pull(args.model_name or settings.model.default)
        if args.command == "run":
            return asyncio.run(run_prompt(settings, args.prompt, args.max_tokens))
        asyncio.run(serve(settings))
        return 0
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
