"""The modular OpenAI-compatible HTTP API (see DESIGN.md, "The modular ChatAPI")."""

from exo.api.chat_api.api import ChatAPI

__all__ = ["ChatAPI"]
