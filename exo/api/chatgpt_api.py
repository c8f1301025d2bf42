"""Backward-compatible name of the API: ``ChatGPTAPI`` is ``exo.api.chat_api.ChatAPI``."""

from exo.api.chat_api.api import ChatAPI


class ChatGPTAPI(ChatAPI):
    """The old exo's name for ``ChatAPI``; same constructor, ``run`` and ``stop``."""


__all__ = ["ChatGPTAPI", "ChatAPI"]
