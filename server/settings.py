"""Settings: every knob of PROTOCOL.md's configuration table, read once and validated at start."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    """A configuration value is missing or out of range; the message names the variable."""


# variable name -> (field name, parser)
_ENV: dict[str, tuple[str, str]] = {
    "TASKMON_HOST": ("host", "str"),
    "TASKMON_PORT": ("port", "int"),
    "TASKMON_STORE": ("store_url", "str"),
    "TASKMON_DATA_DIR": ("data_dir", "path"),
    "TASKMON_HEARTBEAT_S": ("heartbeat_s", "float"),
    "TASKMON_RETRY_MS": ("retry_ms", "int"),
    "TASKMON_HISTORY": ("history", "int"),
    "TASKMON_HISTORY_KB": ("history_kb", "int"),
    "TASKMON_HISTORY_MAX_MB": ("history_max_mb", "int"),
    "TASKMON_STALE_AFTER_S": ("stale_after_s", "float"),
    "TASKMON_LEASE_S": ("lease_s", "float"),
    "TASKMON_CANCEL_GRACE_S": ("cancel_grace_s", "float"),
    "TASKMON_RETENTION_HOURS": ("retention_hours", "float"),
    "TASKMON_CLEANUP_INTERVAL_S": ("cleanup_interval_s", "float"),
    "TASKMON_MAX_STREAMS": ("max_streams", "int"),
    "TASKMON_JOB_WORKERS": ("job_workers", "int"),
    "TASKMON_API_TOKEN": ("api_token", "secret"),
    "TASKMON_READ_TOKEN": ("read_token", "secret"),
    "TASKMON_CORS_ORIGINS": ("cors_origins", "list"),
    "TASKMON_MAX_UPLOAD_MB": ("max_upload_mb", "float"),
    "TASKMON_LOG_LEVEL": ("log_level", "str"),
    "TASKMON_ACCESS_LOG": ("access_log", "bool"),
    "TASKMON_MAX_PROJECT_CHARS": ("max_project_chars", "int"),
    "TASKMON_PDF_TIME_BUDGET_S": ("pdf_time_budget_s", "float"),
    "TASKMON_ALLOWED_HOSTS": ("allowed_hosts", "list"),
    "TASKMON_SECRET": ("secret", "secret"),
    "TASKMON_TASK_TOKEN_TTL_S": ("task_token_ttl_s", "int"),
    "TASKMON_MAX_HEADER_BYTES": ("max_header_bytes", "int"),
    "TASKMON_KEEPALIVE_S": ("keepalive_s", "float"),
    "TASKMON_HEADER_TIMEOUT_S": ("header_timeout_s", "float"),
    "TASKMON_MAX_CONNECTIONS": ("max_connections", "int"),
    "ZEP_API_KEY": ("zep_api_key", "secret"),
    "ZEP_BASE_URL": ("zep_base_url", "secret"),
}

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _finite(value: float) -> bool:
    """inf would pass a `> 0` check and then overflow later (timedelta, int(bytes)); nan fails it anyway."""
    return math.isfinite(value)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    store_url: str = "sqlite:///data/tasks.db"
    data_dir: Path = Path("data")
    heartbeat_s: float = 15.0
    retry_ms: int = 3000
    history: int = 256
    history_kb: int = 8192  # memory:// and redis:// keep at most this much event log per task
    history_max_mb: int = 1024  # ... and at most this much across all tasks
    stale_after_s: float = 300.0
    lease_s: float | None = None  # the default lease of a new task (None: no lease unless asked)
    cancel_grace_s: float = 60.0
    monitor_interval_s: float = 1.0  # how often stale/lease/cancel-grace checks run
    retention_hours: float = 24.0
    cleanup_interval_s: float = 300.0
    max_streams: int = 10_000
    job_workers: int = 4
    api_token: str | None = field(default=None, repr=False)
    read_token: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    max_upload_mb: float = 50.0
    zep_api_key: str | None = field(default=None, repr=False)
    zep_base_url: str | None = None
    log_level: str = "warning"
    access_log: bool = False
    # Hardening (README, "Limits and browser protection")
    max_project_chars: int = 5_000_000  # text of one project (upload, JSON or extracted from PDFs)
    pdf_time_budget_s: float = 20.0  # CPU-bound PDF text extraction per request
    allowed_hosts: tuple[str, ...] = ()  # empty: loopback names plus TASKMON_HOST; "*" allows any
    secret: str | None = field(default=None, repr=False)  # signs per-task read tokens
    task_token_ttl_s: int = 3600
    max_header_bytes: int = 64 * 1024
    keepalive_s: float = 5.0
    header_timeout_s: float = 10.0
    max_connections: int = 50_000
    # Subscriber buffer: frames kept per stream before coalescing to the newest snapshot per task.
    queue_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        object.__setattr__(self, "log_level", self.log_level.lower())
        self._validate()

    def _validate(self) -> None:
        checks: list[tuple[bool, str]] = [
            (0 < self.port < 65536, "TASKMON_PORT must be 1..65535"),
            (_finite(self.heartbeat_s) and self.heartbeat_s > 0, "TASKMON_HEARTBEAT_S must be a finite number > 0"),
            (self.retry_ms >= 0, "TASKMON_RETRY_MS must be >= 0"),
            (self.history >= 1, "TASKMON_HISTORY must be >= 1"),
            (self.history_kb >= 1, "TASKMON_HISTORY_KB must be >= 1"),
            (self.history_max_mb >= 1, "TASKMON_HISTORY_MAX_MB must be >= 1"),
            (_finite(self.stale_after_s) and self.stale_after_s > 0, "TASKMON_STALE_AFTER_S must be a finite number > 0"),
            (
                self.lease_s is None or (_finite(self.lease_s) and 0 < self.lease_s <= 7 * 24 * 3600),
                "TASKMON_LEASE_S must be a number of seconds > 0 and at most 7 days",
            ),
            (_finite(self.cancel_grace_s) and self.cancel_grace_s >= 0, "TASKMON_CANCEL_GRACE_S must be a finite number >= 0"),
            (_finite(self.monitor_interval_s) and self.monitor_interval_s > 0, "monitor_interval_s must be > 0"),
            (_finite(self.retention_hours) and self.retention_hours > 0, "TASKMON_RETENTION_HOURS must be a finite number > 0"),
            (
                _finite(self.cleanup_interval_s) and self.cleanup_interval_s > 0,
                "TASKMON_CLEANUP_INTERVAL_S must be a finite number > 0",
            ),
            (self.max_streams >= 1, "TASKMON_MAX_STREAMS must be >= 1"),
            (self.job_workers >= 1, "TASKMON_JOB_WORKERS must be >= 1"),
            (_finite(self.max_upload_mb) and self.max_upload_mb > 0, "TASKMON_MAX_UPLOAD_MB must be a finite number > 0"),
            (self.max_project_chars >= 1, "TASKMON_MAX_PROJECT_CHARS must be >= 1"),
            (
                _finite(self.pdf_time_budget_s) and self.pdf_time_budget_s > 0,
                "TASKMON_PDF_TIME_BUDGET_S must be a finite number > 0",
            ),
            (self.task_token_ttl_s >= 1, "TASKMON_TASK_TOKEN_TTL_S must be >= 1"),
            (self.max_header_bytes >= 1024, "TASKMON_MAX_HEADER_BYTES must be >= 1024"),
            (_finite(self.keepalive_s) and self.keepalive_s > 0, "TASKMON_KEEPALIVE_S must be a finite number > 0"),
            (
                _finite(self.header_timeout_s) and self.header_timeout_s > 0,
                "TASKMON_HEADER_TIMEOUT_S must be a finite number > 0",
            ),
            (self.max_connections >= 1, "TASKMON_MAX_CONNECTIONS must be >= 1"),
            (self.queue_size >= 2, "queue_size must be >= 2"),
            (self.log_level in _LOG_LEVELS, f"TASKMON_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}"),
            (
                self.store_url.startswith(("memory://", "sqlite:///", "redis://", "rediss://", "unix://")),
                "TASKMON_STORE must be memory://, sqlite:///PATH or redis://HOST:PORT/DB",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from TASKMON_* variables; keyword overrides (CLI flags) win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var, (name, kind) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse(var, kind, raw.strip())
        known = {f.name for f in fields(cls)}
        for name, value in overrides.items():
            if name not in known:
                raise SettingsError(f"unknown setting {name!r}")
            if value is not None:
                values[name] = value
        return cls(**values)

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _parse(var: str, kind: str, raw: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{var} must be a number, got {raw!r}") from None
    if kind == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(f"{var} must be 1/true/yes or 0/false/no, got {raw!r}")
    if kind == "path":
        return Path(raw)
    if kind == "list":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
