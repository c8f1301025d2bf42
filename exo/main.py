"""The ``exo`` command: start a node, or run one prompt through the cluster and print the answer."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from exo.orchestration.launcher import DEFAULT_API_PORT, NodeConfig, parse_interfaces, start_node

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The CLI; flag names follow the old exo where they exist."""
    p = argparse.ArgumentParser(
        prog="exo",
        description="Run a node of an exo inference cluster (default), or `exo run MODEL --prompt TEXT`.",
    )
    p.add_argument("command", nargs="?", choices=["run", "pull"],
                   help="`run`: answer --prompt with MODEL and exit; `pull`: download MODEL's weights and exit")
    p.add_argument("model_name", nargs="?", help="model for `run` / `pull` (default: --default-model): a catalogue id, "
                                                 "a .gguf path, a Hugging Face directory or repo (org/name[:FILE.gguf|:QUANT])")
    p.add_argument("--prompt", default="Who are you?", help="prompt for `run`")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens `run` generates")
    p.add_argument("--node-id", default=None, help="unique id of this node (default: a random UUID)")
    p.add_argument("--node-host", default=None,
                   help="address the gRPC server binds (default: 127.0.0.1 when --interfaces is loopback-only, else 0.0.0.0)")
    p.add_argument("--node-port", type=int, default=0, help="gRPC port (default: a free port)")
    p.add_argument("--chatgpt-api-port", type=int, default=DEFAULT_API_PORT, help="HTTP API and web UI port")
    p.add_argument("--api-host", default=None, help="address the HTTP API binds (default: as --node-host)")
    p.add_argument("--discovery-module", choices=["mdns", "manual", "none"], default="mdns",
                   help="how peers are found: mDNS (zeroconf), a JSON file of peers, or none")
    p.add_argument("--discovery-config-path", default=None, help="JSON peer list for --discovery-module manual")
    p.add_argument("--interfaces", default=os.environ.get("EXO_INTERFACES"),
                   help="comma list of addresses or interface names discovery may use, or 'all' "
                        "(env EXO_INTERFACES; default all). Use 127.0.0.1 to keep a node on this machine.")
    p.add_argument("--inference-engine", choices=["torch", "tinygrad", "mlx", "dummy"], default=None,
                   help="engine (default: the best one installed)")
    p.add_argument("--default-model", default="smollm2-135m", help="model served when a request names none")
    p.add_argument("--max-models", type=int, default=3, help="models whose shards this node holds at once")
    p.add_argument("--model-idle-ttl", type=float, default=300.0, help="seconds an unused model stays loaded")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="torch engine: a request's logits do not depend on the requests batched with it, so a seed gives "
                        "the same answer at any load (default); --no-batch-invariant lets batches take faster paths (AMX)")
    p.add_argument("--wait-for-peers", type=int, default=0, help="wait for this many peers before serving")
    p.add_argument("--cluster-secret", default=None,
                   help="shared key; only nodes with the same key join (env EXO_CLUSTER_SECRET)")
    p.add_argument("--memory", type=int, default=None,
                   help="bytes of memory this node offers for weights (default: detected; env EXO_MEMORY_BYTES)")
    p.add_argument("--response-timeout", type=float, default=60.0, help="seconds to wait for the next token")
    p.add_argument("--log-level", default=os.environ.get("EXO_LOG_LEVEL", "INFO"), help="logging level")
    p.add_argument("--config", default=None,
                   help="YAML configuration file (env EXO_CONFIG; see config.example.yaml); flags given override it")
    return p


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    kwargs = dict(
        node_host=args.node_host, node_port=args.node_port, api_host=args.api_host,
        api_port=args.chatgpt_api_port, discovery_module=args.discovery_module,
        discovery_config_path=args.discovery_config_path, interfaces=parse_interfaces(args.interfaces),
        inference_engine=args.inference_engine, default_model=args.model_name or args.default_model,
        wait_for_peers=args.wait_for_peers, cluster_secret=args.cluster_secret, memory=args.memory,
        response_timeout=args.response_timeout, max_models=args.max_models, model_idle_ttl=args.model_idle_ttl,
        batch_invariant=args.batch_invariant,
    )
    if args.node_id:
        kwargs["node_id"] = args.node_id
    if args.command == "run":
        kwargs["serve_api"] = False
    return NodeConfig(**kwargs)


async def serve(config: NodeConfig) -> None:
    """Run a node until SIGINT/SIGTERM."""
    running = await start_node(config)
    logger.info("node %s serving; API and web UI at %s/", config.node_id, running.api_base_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()


async def run_prompt(config: NodeConfig, prompt: str, max_tokens: int) -> int:
    """Answer ``prompt`` with the chat template of the default model (a base model without one
    continues the prompt as plain text), printing tokens as they come."""
    from exo.inference.generation import GenerationOptions
    from exo.inference.tokenizers import IncrementalDetokenizer

    running = await start_node(config)
    try:
        node = running.node
        tok = await node.get_tokenizer(config.default_model)
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if tok.chat_template else prompt
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        options = GenerationOptions(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.eos_token_ids)
        async for result in node.generate(config.default_model, ids, options):
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
    from exo.config import ConfigError, apply_config, setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        file_config = apply_config(parser, args, argv)  # the file's values where no flag was given
        setup_logging(file_config.logging)
    except (ConfigError, OSError) as e:
        logging.basicConfig(stream=sys.stderr)
        logger.error("%s", e)
        return 2
    config = config_from_args(args)
    config.api_options = file_config.api_options()
    config.chat_templates = dict(file_config.model.chat_templates)
    try:
        if args.command == "pull":
            return pull(args.model_name or args.default_model)
        if args.command == "run":
            return asyncio.run(run_prompt(config, args.prompt, args.max_tokens))
        asyncio.run(serve(config))
        return 0
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
