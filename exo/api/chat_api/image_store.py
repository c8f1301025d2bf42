"""The PNGs answered as ``url``: kept by the node that answered, served at ``/images/{id}.png``
for ``ttl`` seconds, at most ``max_images`` and ``max_bytes`` of them (the oldest go first)."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict

DEFAULT_TTL = 3600.0  # seconds an image URL answers
DEFAULT_MAX_IMAGES = 256
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class ImageStore:
    """PNGs by random id (32 hex digits), each until ``ttl`` seconds after it was added."""

    def __init__(self, ttl: float = DEFAULT_TTL, max_images: int = DEFAULT_MAX_IMAGES,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.ttl, self.max_images, self.max_bytes = ttl, max_images, max_bytes
        self._images: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # id -> (png, expiry)
        self._bytes = 0

    def _drop_oldest(self) -> None:
        _, (png, _) = self._images.popitem(last=False)
        self._bytes -= len(png)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._images and next(iter(self._images.values()))[1] <= now:
            self._drop_oldest()

    def add(self, png: bytes) -> str:
        """Keep ``png``; its id."""
        self._expire()
        image_id = uuid.uuid4().hex
        self._images[image_id] = (png, time.monotonic() + self.ttl)
        self._bytes += len(png)
        while len(self._images) > self.max_images or (self._bytes > self.max_bytes and len(self._images) > 1):
            self._drop_oldest()
        return image_id

    def get(self, image_id: str) -> bytes | None:
        """The PNG of ``image_id``, or None once expired (or never added)."""
        self._expire()
        entry = self._images.get(image_id)
        return entry[0] if entry is not None else None
