"""The ``logging`` section of the settings (``exo.config.Settings``) and ``setup_logging``,
which applies it: a console handler and, with a directory, one rotating file per level.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SECTION = ConfigDict(extra="forbid")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LoggingConfig(BaseModel):
    """``logging``: console logging, and rotating log files split by level.

    Attributes:
        level: least severe level logged (flag ``--log-level``, env ``EXO_LOG_LEVEL``).
        format: ``logging`` format string of every handler.
        dir: when set, one rotating file per level in ``file_levels`` is written there,
            ``exo.<level>.log`` holding the records of that level (``exo.error.log`` also
            holds CRITICAL); the directory is created.
        file_levels: levels that get a file.
        max_bytes: size (bytes) at which a file is rotated.
        backup_count: rotated files kept per level.
    """

    model_config = _SECTION
    level: str = "INFO"
    format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    dir: Path | None = None
    file_levels: list[str] = Field(default_factory=lambda: ["DEBUG", "INFO", "WARNING", "ERROR"])
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    backup_count: int = Field(5, ge=0)

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in LOG_LEVELS:
            raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        return v

    @field_validator("file_levels")
    @classmethod
    def _file_levels(cls, v: list[str]) -> list[str]:
        out = [x.upper() for x in v]
        for x in out:
            if x not in LOG_LEVELS[:-1]:
                raise ValueError(f"file_levels entries must be one of DEBUG, INFO, WARNING, ERROR, got {x!r}")
        return out


_HANDLER_TAG = "_exo_config_handler"
_NEXT_LEVEL = {"DEBUG": logging.INFO, "INFO": logging.WARNING, "WARNING": logging.ERROR, "ERROR": logging.CRITICAL + 1}


class _LevelBand(logging.Filter):
    """Passes records with ``low <= levelno < high``."""

    def __init__(self, low: int, high: int):
        super().__init__()
        self.low, self.high = low, high

    def filter(self, record: logging.LogRecord) -> bool:
        return self.low <= record.levelno < self.high


def setup_logging(cfg: LoggingConfig, root: logging.Logger | None = None) -> list[logging.Handler]:
    """Configure the root logger: a console handler (stderr) and, when ``cfg.dir`` is set, one
    ``RotatingFileHandler`` per level of ``cfg.file_levels``. Handlers a previous call installed
    are removed first (calling it twice does not duplicate lines); others are left alone.

    Returns:
        the handlers installed.

    Raises:
        OSError: the log directory cannot be created.
    """
    root = root or logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_TAG, False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter(cfg.format)
    console = logging.StreamHandler(sys.stderr)
    handlers: list[logging.Handler] = [console]
    if cfg.dir is not None:
        cfg.dir.mkdir(parents=True, exist_ok=True)
        for name in cfg.file_levels:
            h = logging.handlers.RotatingFileHandler(cfg.dir / f"exo.{name.lower()}.log", maxBytes=cfg.max_bytes,
                                                     backupCount=cfg.backup_count, encoding="utf-8")
            h.addFilter(_LevelBand(logging.getLevelName(name), _NEXT_LEVEL[name]))
            handlers.append(h)
    for h in handlers:
        h.setFormatter(fmt)
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    root.setLevel(cfg.level)
    return handlers
