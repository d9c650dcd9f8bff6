"""One logging configuration: JSON lines on stderr, quiet (warnings) unless asked otherwise."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra}``; exceptions as one ``exc`` string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "warning", access_log: bool = False) -> dict[str, Any]:
    """Configure the root, ``server`` and uvicorn loggers once; returns the dictConfig used."""
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "server": {"level": level.upper(), "propagate": True},
            "uvicorn": {"level": level.upper(), "propagate": True, "handlers": []},
            "uvicorn.error": {"level": level.upper(), "propagate": True, "handlers": []},
            "uvicorn.access": {"level": "INFO" if access_log else "WARNING", "propagate": True, "handlers": []},
        },
    }
    logging.config.dictConfig(config)
    return config
