"""Downloads from the Hugging Face hub, by shard: a node fetches only what its own layers need.

A model on the hub is named ``org/name`` (a safetensors repo, or a GGUF repo: its default quant
file), ``org/name:FILE.gguf`` or ``org/name:Q4_K_M`` (a GGUF file by quant tag), with Ollama's
``hf.co/`` / ``huggingface.co/`` prefixes (``parse_hub_name``). ``HubDownloader`` then:

1. ``resolve``: lists the repo's files (sizes, LFS sha256) at a commit through
   ``huggingface_hub.HfApi`` and decides what the model is: ``"safetensors"`` or ``"gguf"``
   (which file, all its splits).
2. ``ensure_header``: a local path ``open_weights`` can open to learn the architecture and the
   layer count. Safetensors: the snapshot directory with config.json, the tokenizer files and
   model.safetensors.index.json (``hf_hub_download`` into the standard cache). GGUF: a sparse
   local file of the remote file's full size (one per split) holding the header, fetched by
   HTTP ``Range`` requests, and every small non-layer tensor (norms, rope factors), which the
   reader reads when it opens.
3. ``ensure_shard``: the safetensors files holding a shard's tensors, or only the byte ranges
   of a GGUF's shard tensors (what is already there is never fetched again: a re-partition
   fetches only what is missing, and a cut transfer resumes from its last byte written).
4. ``ensure_all``: everything (``exo pull``), every file's size in the progress from the start.
5. ``delete``: the model's files out of the cache (no request).

Cache layout (``$HF_HOME/hub``, or ``$HF_HUB_CACHE``), as ``huggingface_hub`` keeps it, plus one
directory of exo's own::

    models--org--name/
      refs/main                        commit hash of the revision
      blobs/<etag>                     files fetched whole (safetensors, config, tokenizer)
      snapshots/<commit>/<file>        -> ../../blobs/<etag>
      exo-partial/<commit>/
        listing.json                   the repo's files at the commit (for offline resolves)
        <file>.gguf                    sparse copy of a remote GGUF (split), its full size
        <file>.gguf.exo.json           sidecar: byte ranges present, remote size/sha256/commit

A GGUF stays in ``exo-partial`` even once every byte is present (and its sha256 checked): it
is a complete GGUF file there, and the same path serves every later shard.

Environment (read when a ``HubDownloader`` is made; arguments override): ``HF_ENDPOINT``,
``HF_TOKEN`` (sent as ``Authorization: Bearer``, never logged), ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` (resolve and load from the cache only; no request is made). Note that
``huggingface_hub`` itself reads ``HF_HUB_OFFLINE`` once, at import: when it is on there, this
module is offline too.

Failing fast: every request has a timeout (``timeout``, 10 s); connection errors are not
retried in a loop (each file is checked with one HEAD before ``hf_hub_download``, whose own
retries after a failed HEAD would otherwise back off for ~23 s); a GGUF range transfer cut
after making progress resumes at once, at most ``resumes`` times. Errors reach the caller as
``DownloadError``, whose message names the model, the repo or file, and what to do.

Progress: ``DownloadProgress`` (``PROGRESS`` by default) holds per model id (the name the user
gave) the state, bytes needed / present, files and speed; ``snapshot()`` is JSON-able (the
shape is documented there). tqdm bars show each transfer in a terminal.

Everything here is synchronous, blocking I/O: the node calls it from a thread.

Modules: ``names`` (hub names, ``HubRef``, ``HubModel``, which files a name picks), ``errors``
(``DownloadError`` and the messages for users), ``progress`` (``DownloadProgress``, the tqdm
bar), ``partial`` (sparse GGUF copies and their sidecars), ``cache`` (the cache read without a
request: offline listings, completeness, deletion), ``ranges`` (GGUF byte-range transfers) and
``downloader`` (``HubDownloader``, whole files through ``hf_hub_download``).
"""

from exo.models.hub.cache import HEADER_FILES
from exo.models.hub.downloader import HubDownloader
from exo.models.hub.errors import DownloadError, NotOnHub
from exo.models.hub.names import DEFAULT_QUANT, HubModel, HubRef, RemoteFile, parse_hub_name
from exo.models.hub.progress import PROGRESS, DownloadProgress

__all__ = ["DownloadError", "NotOnHub", "HubRef", "HubModel", "RemoteFile", "HubDownloader", "DownloadProgress", "PROGRESS",
           "parse_hub_name", "DEFAULT_QUANT", "HEADER_FILES"]
