"""One logging configuration: JSON lines on stderr, quiet (warnings) unless asked otherwise."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "RedactTokens", "configure_logging", "redact"]

# ?access_token=..., &token=..., &read_token=...: the value, up to the next & or # or space
_TOKEN_QUERY = re.compile(r"(?i)((?:[?&]|^)[a-z0-9_.-]*token=)[^&#\s]*")


def redact(text: str) -> str:
    """``/x?access_token=s3cret&a=1`` -> ``/x?access_token=[redacted]&a=1``."""
    return _TOKEN_QUERY.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Rewrites query tokens out of a record's message arguments (uvicorn's access log passes the
    path with its query string as an argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) and "token=" in a.lower() else a for a in record.args)
        elif isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = redact(record.msg)
        return True

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
        "filters": {"redact_tokens": {"()": RedactTokens}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "server": {"level": level.upper(), "propagate": True},
            "uvicorn": {"level": level.upper(), "propagate": True, "handlers": []},
            "uvicorn.error": {"level": level.upper(), "propagate": True, "handlers": []},
            "uvicorn.access": {
                "level": "INFO" if access_log else "WARNING",
                "propagate": True,
                "handlers": [],
                "filters": ["redact_tokens"],
            },
        },
    }
    logging.config.dictConfig(config)
    return config
