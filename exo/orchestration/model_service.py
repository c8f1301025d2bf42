"""The node's model-facing part: model cards, pulls, deletes, downloads and their failures,
each model's state on this node, shard loads (``ensure_shard``), tokenizers with their chat
templates, and preloading this node's shard of a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from exo.inference.inference_engine import InferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer, tokenizer_for_path
from exo.models.hub import DownloadError, NotOnHub
from exo.models.sources import ModelCard, ModelNotFound, ModelStore, NotDeletable, canonical_name
from exo.orchestration.background import Background
from exo.orchestration.errors import (
    InvalidModelError, ModelBusyError, ModelNotFoundError, ModelUnavailableError, NoNodeAvailableError,
    NodeStoppingError,
)
from exo.orchestration.membership import Membership
from exo.orchestration.shards import ShardCache

logger = logging.getLogger(__name__)

#: Seconds a model whose download failed on this node counts as unservable (``download_failure``)
#: before a request may try to download it again.
DOWNLOAD_RETRY_AFTER = 60.0


@contextlib.contextmanager
def _model_errors(model_id: str) -> Iterator[None]:
    """The model store's errors for ``model_id`` as the API's.

    Raises:
        ModelNotFoundError: no such file, catalogue id or hub repo.
        ModelUnavailableError: the download failed (offline, the endpoint down).
        InvalidModelError: not a model exo can run (an unsupported architecture, a truncated
            file) or a local disk error; the message names the model.
    """
    try:
        yield
    except (ModelNotFound, FileNotFoundError) as e:
        raise ModelNotFoundError(str(e.args[0]) if e.args else str(e)) from None
    except NotOnHub as e:
        raise ModelNotFoundError(str(e)) from None
    except DownloadError as e:
        raise ModelUnavailableError(str(e)) from None
    except (ValueError, OSError) as e:
        raise InvalidModelError(str(e) if model_id in str(e) else f"{model_id}: {e}") from None


class ModelService:
    """Models on node ``node_id``.

    Args:
        shards: the shards this node holds (its engines).
        store: where model names resolve and weights come from.
        chat_templates: canonical model id -> chat template for a model that has none.
        default_model: canonical id of the model kept loaded (never evicted), or None.
        membership: the ring a model's shard is part of.
        background: spawns card look-ups and preloads; its ``stopping`` refuses pulls.
    """

    def __init__(self, node_id: str, shards: ShardCache, store: ModelStore, chat_templates: dict[str, str],
                 default_model: str | None, membership: Membership, background: Background):
        self.id = node_id
        self.shards = shards
        self.store = store
        self.chat_templates = chat_templates
        self.default_model = default_model
        self._membership = membership
        self._background = background
        self._cards: dict[str, ModelCard] = {}  # model id -> its card, once resolved
        self.requested_models: set[str] = set()  # models requests through this node named
        self._left_out_logged: dict[str, str] = {}  # model id -> reason this node holds no layer
        self._loading: dict[str, int] = {}  # model id -> shard loads in progress
        self.pulls: dict[str, asyncio.Task] = {}  # model id -> its whole download in progress (``pull``)
        self._download_failures: dict[str, tuple[str, float]] = {}  # model id -> (error, monotonic time)

    async def warm_cards(self) -> None:
        """Resolve the default model's card, and start resolving each installed catalogue
        model's (listed as "available" by /v1/models)."""
        if self.default_model:  # its card first: partitions, /health and /v1/topology need it
            await self._warm_card(self.default_model)
        for model_id in self.store.installed_catalogue_ids():
            if model_id != self.default_model:
                self._background.spawn(self._warm_card(model_id), f"model-card-{model_id}")

    async def _warm_card(self, model_id: str) -> None:
        try:
            await self.model_card(model_id)
        except Exception as e:
            logger.warning("model %s: %s", model_id, e)

    def preload_default(self) -> None:
        """Load this node's shard of the default model of the current ring, in the background."""
        if self.default_model:
            self._background.spawn(self._preload(self.default_model), "preload")

    async def _preload(self, model_id: str) -> None:
        try:
            card = await self.model_card(model_id)
        except Exception as e:
            logger.warning("cannot preload %s: %s", model_id, e)
            return
        if card.path is None and card.source != "hub":
            return  # not on this machine: loaded (downloaded) by the first request
        try:
            plan = self._membership.partition_plan(card)
            reason = plan.left_out.get(self.id, "")
            if reason != self._left_out_logged.get(model_id, ""):
                if reason:
                    logger.warning("node %s holds no layer of %s: %s", self.id, model_id, reason)
                else:
                    logger.info("node %s is back in the ring of %s", self.id, model_id)
                self._left_out_logged[model_id] = reason
            for p in plan.ring:
                if p.node_id == self.id:
                    await self.ensure_shard(Shard(model_id, p.start_layer, p.end_layer, card.n_layers))
        except Exception:
            logger.exception("preloading %s failed", model_id)

    async def evict_idle(self) -> None:
        """Unload the shards idle past their TTL (never the default model's)."""
        await self.shards.evict_idle(pinned={self.default_model} if self.default_model else ())

    async def model_card(self, name: str) -> ModelCard:
        """The card of model ``name`` (resolved once, in a thread: reading a header may take a
        second, fetching a hub model's header longer).

        Raises:
            ModelNotFoundError: an unknown name, or a path with nothing there.
            InvalidModelError: a file that is not a model exo can run (the message says why).
        """
        model_id = canonical_name(name)
        card = self._cards.get(model_id)
        if card is not None:
            return card
        with self._downloading(model_id), _model_errors(model_id):
            card = await asyncio.to_thread(self.store.card, model_id)
        self._cards[model_id] = card
        return card

    @contextlib.contextmanager
    def _downloading(self, model_id: str) -> Iterator[None]:
        """Remember a ``ModelUnavailableError`` (a failed download) of ``model_id`` raised in the
        block, for ``download_failure``; re-raises it."""
        try:
            yield
        except ModelUnavailableError as e:
            self._download_failures[model_id] = (str(e), time.monotonic())
            raise

    def download_failure(self, name: str) -> str | None:
        """Why the latest download of model ``name``'s files on this node failed, if it failed
        less than ``DOWNLOAD_RETRY_AFTER`` seconds ago and nothing of it downloaded since (no I/O):
        callers that have another model to use skip this one instead of downloading again."""
        model_id = canonical_name(name)
        failure = self._download_failures.get(model_id)
        if failure is None:
            return None
        error, at = failure
        if time.monotonic() - at >= DOWNLOAD_RETRY_AFTER:
            del self._download_failures[model_id]
            return None
        return error

    def cached_card(self, name: str) -> ModelCard | None:
        """The card of ``name`` if this node resolved it before (no I/O)."""
        return self._cards.get(canonical_name(name))

    def known_card(self, model_id: str) -> ModelCard | None:
        """The card of the canonical ``model_id`` if this node or the store resolved it before."""
        return self._cards.get(model_id) or self.store.cached(model_id)

    def available_models(self) -> list[ModelCard]:
        """Every model this node knows (the catalogue, and each model named to it so far)."""
        known = {c.model_id: c for c in self.store.cards()}
        known.update(self._cards)
        return sorted(known.values(), key=lambda c: c.model_id)

    def model_state(self, model_id: str) -> str:
        """This node's readiness for ``model_id``: "loading" while it loads a shard of it, "ready"
        when it holds its shard of the current ring, "downloading" while its files come,
        "available" when its weights are here (loaded by the first request), else "not
        downloaded"."""
        model_id = canonical_name(model_id)
        if self._loading.get(model_id):
            return "loading"
        card = self.known_card(model_id)
        engine = self.shards.get(model_id)
        shard = engine.shard if engine is not None else None
        if shard is not None and card is not None:
            try:
                mine = [(p.start_layer, p.end_layer) for p in self._membership.partition(card) if p.node_id == self.id]
            except NoNodeAvailableError:
                mine = []
            if mine == [(shard.start_layer, shard.end_layer)]:
                return "ready"
        download = self.store.download_state(model_id)
        if model_id in self.pulls or (download is not None and download.get("state") == "downloading"):
            return "downloading"
        return "available" if self.store.is_complete(model_id) else "not downloaded"

    async def pull(self, name: str) -> ModelCard:
        """Download every file of model ``name`` to this machine (nothing to do for a local one
        or one a package ships); its card, with its local path. Concurrent pulls of one model
        share one download, which goes on when its callers stop waiting (it runs in a thread).

        Raises:
            ModelNotFoundError: an unknown name, or a path with nothing there.
            InvalidModelError: not a model exo can run.
            ModelUnavailableError: it cannot be downloaded now (the hub unreachable, offline,
                a gated repo without a token; the message says why).
            NodeStoppingError: the node is shutting down.
        """
        model_id = canonical_name(name)
        task = self.pulls.get(model_id)
        if task is None:
            if self._background.stopping:
                raise NodeStoppingError(f"node {self.id} is shutting down")
            task = asyncio.create_task(self._pull(model_id), name=f"pull-{model_id}")
            self.pulls[model_id] = task

            def done(t: asyncio.Task) -> None:
                if self.pulls.get(model_id) is t:
                    del self.pulls[model_id]
                if not t.cancelled():
                    t.exception()  # retrieved: each caller gets it from its own await

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _pull(self, model_id: str) -> ModelCard:
        with self._downloading(model_id), _model_errors(model_id):
            await asyncio.to_thread(self.store.pull, model_id)
            card = await asyncio.to_thread(self.store.card, model_id)
        self._cards[model_id] = card
        self._download_failures.pop(model_id, None)
        logger.info("pulled %s: %s", model_id, card.path)
        return card

    async def delete_model(self, name: str) -> None:
        """Remove model ``name``'s downloaded files from this machine's Hugging Face cache and
        unload its shard (and that of any other name for the same files). A later request
        downloads it again.

        Raises:
            InvalidModelError: a local path or a model an installed package ships: exo never
                deletes a user's own files (the message says how to remove it).
            ModelNotFoundError: an unknown name, or nothing of it downloaded here.
            ModelBusyError: it is being downloaded or loaded, or a request is using it.
        """
        model_id = canonical_name(name)
        download = self.store.download_state(model_id)
        if model_id in self.pulls or (download is not None and download.get("state") == "downloading"):
            raise ModelBusyError(f"{model_id} is being downloaded; delete it once the download is over")
        if self._loading.get(model_id) or self.shards.in_use(model_id):
            raise ModelBusyError(f"{model_id} is in use on node {self.id}; delete it once its requests are over")
        try:
            await asyncio.to_thread(self.store.delete, model_id)
        except NotDeletable as e:
            raise InvalidModelError(str(e)) from None
        except ModelNotFound as e:
            raise ModelNotFoundError(str(e)) from None
        gone = {model_id}
        for mid, card in list(self._cards.items()):  # every name whose files went
            if card.path is not None and not card.path.exists():
                self._cards[mid] = replace(card, path=None)
                gone.add(mid)
        for mid in sorted(gone):
            if self.shards.get(mid) is not None and not self.shards.in_use(mid):
                await self.shards.evict(mid, "its files were deleted")
        logger.info("deleted the files of %s", model_id)

    def downloads(self) -> dict[str, dict]:
        """This node's downloads, in progress or done, by model id
        (``exo.models.hub.DownloadProgress.snapshot``)."""
        return self.store.downloads()

    async def ensure_shard(self, shard: Shard) -> InferenceEngine:
        """Have an engine hold ``shard`` (downloading what its layers need first), counting the
        load for ``model_state``; the engine."""
        engine = self.shards.get(shard.model_id)
        if engine is not None and engine.shard == shard:
            self.shards.touch(shard.model_id)
            return engine
        self._loading[shard.model_id] = self._loading.get(shard.model_id, 0) + 1
        try:
            card = await self.model_card(shard.model_id)
            incoming = sum((card.layer_bytes or ())[shard.start_layer:shard.end_layer + 1]) or card.max_layer_bytes * shard.n_shard_layers
            with self._downloading(shard.model_id):
                try:
                    await asyncio.to_thread(self.store.ensure_shard, shard.model_id, shard.start_layer, shard.end_layer)
                except DownloadError as e:
                    raise ModelUnavailableError(str(e)) from None
            self._download_failures.pop(shard.model_id, None)
            if card.path is None:  # its header came with the shard: the card knows its real sizes now
                self._cards[card.model_id] = card = await asyncio.to_thread(self.store.card, card.model_id)
            engine = await self.shards.engine_for(shard.model_id, incoming, pinned={self.default_model})
            await engine.ensure_shard(shard)
            return engine
        finally:
            self._loading[shard.model_id] -= 1
            if not self._loading[shard.model_id]:
                del self._loading[shard.model_id]

    async def ensure_pipeline(self, name: str) -> ModelCard:
        """The card of image model ``name`` with its pipeline directory on this machine
        (downloaded from the hub first when needed), counting the download for ``model_state``.

        Raises:
            ModelNotFoundError, InvalidModelError: as ``model_card``.
            ModelUnavailableError: not here and cannot be downloaded now.
        """
        model_id = canonical_name(name)
        card = self._cards.get(model_id)
        if card is not None and card.path is not None:
            return card
        self._loading[model_id] = self._loading.get(model_id, 0) + 1
        try:
            with self._downloading(model_id), _model_errors(model_id):
                card = await asyncio.to_thread(self.store.ensure_pipeline, model_id)
        finally:
            self._loading[model_id] -= 1
            if not self._loading[model_id]:
                del self._loading[model_id]
        self._cards[model_id] = card
        return card

    async def get_tokenizer(self, model_id: str) -> Tokenizer:
        """The tokenizer of ``model_id`` (from its GGUF metadata or its directory's tokenizer files).

        Raises:
            ModelNotFoundError, InvalidModelError: as ``model_card``.
            ModelUnavailableError: its files are not on this machine and cannot be fetched now.
        """
        card = await self.model_card(model_id)
        if card.path is None:
            with self._downloading(card.model_id):
                try:
                    card = await asyncio.to_thread(self.store.ensure_header, card.model_id)
                except (DownloadError, FileNotFoundError) as e:
                    raise ModelUnavailableError(str(e)) from None
            self._cards[card.model_id] = card
        try:
            tok = await asyncio.to_thread(tokenizer_for_path, card.path)
        except (ValueError, KeyError) as e:
            raise InvalidModelError(f"{model_id}: its tokenizer cannot be read: {e}") from None
        template = self.chat_templates.get(card.model_id)
        if template and not tok.chat_template:
            if template.endswith((".jinja", ".j2")) and os.path.isfile(template):
                template = await asyncio.to_thread(Path(template).read_text)
            tok = tok.with_chat_template(template)
        return tok
