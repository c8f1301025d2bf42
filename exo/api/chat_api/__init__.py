"""The modular OpenAI-compatible HTTP API (see DESIGN.md, "The modular ChatAPI").

``ChatAPI`` is imported on first use, so that the serving layer (``exo.api.serving``) can use
this package's small modules (errors, state) without importing every route module.
"""

__all__ = ["ChatAPI"]


def __getattr__(name: str):
    if name == "ChatAPI":
        from exo.api.chat_api.api import ChatAPI

        return ChatAPI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
