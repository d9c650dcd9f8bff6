"""Settings.from_env: parsing, overrides, errors that name the variable; bad CLI input exits 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_empty_environment_gives_the_documented_defaults():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.store_url == "sqlite:///data/tasks.db"
    assert settings.data_dir == Path("data")
    assert settings.heartbeat_s == 15
    assert settings.retry_ms == 3000
    assert settings.history == 256
    assert settings.retention_hours == 24
    assert settings.cleanup_interval_s == 300
    assert settings.max_streams == 10_000
    assert settings.job_workers == 4
    assert settings.api_token is None
    assert settings.read_token is None
    assert settings.cors_origins == ()
    assert settings.max_upload_mb == 50
    assert settings.max_upload_bytes == 50 * 1024 * 1024
    assert settings.zep_api_key is None
    assert settings.zep_base_url is None


def test_every_variable_is_read():
    env = {
        "TASKMON_HOST": "0.0.0.0",
        "TASKMON_PORT": "9123",
        "TASKMON_STORE": "memory://",
        "TASKMON_DATA_DIR": "/var/lib/taskmon",
        "TASKMON_HEARTBEAT_S": "2.5",
        "TASKMON_RETRY_MS": "500",
        "TASKMON_HISTORY": "16",
        "TASKMON_RETENTION_HOURS": "0.5",
        "TASKMON_CLEANUP_INTERVAL_S": "60",
        "TASKMON_MAX_STREAMS": "7",
        "TASKMON_JOB_WORKERS": "2",
        "TASKMON_API_TOKEN": "write-me",
        "TASKMON_READ_TOKEN": "read-me",
        "TASKMON_CORS_ORIGINS": "https://a.example, https://b.example,,",
        "TASKMON_MAX_UPLOAD_MB": "1.5",
        "TASKMON_LOG_LEVEL": "DEBUG",
        "TASKMON_ACCESS_LOG": "Yes",
        "ZEP_API_KEY": "zk",
        "ZEP_BASE_URL": "http://zep.local:8000",
    }
    s = Settings.from_env(env)
    assert (s.host, s.port, s.store_url, s.data_dir) == ("0.0.0.0", 9123, "memory://", Path("/var/lib/taskmon"))
    assert (s.heartbeat_s, s.retry_ms, s.history) == (2.5, 500, 16)
    assert (s.retention_hours, s.cleanup_interval_s) == (0.5, 60.0)
    assert (s.max_streams, s.job_workers) == (7, 2)
    assert (s.api_token, s.read_token) == ("write-me", "read-me")
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.max_upload_bytes == int(1.5 * 1024 * 1024)
    assert s.log_level == "debug"
    assert s.access_log is True and Settings.from_env({"TASKMON_ACCESS_LOG": "0"}).access_log is False
    assert (s.zep_api_key, s.zep_base_url) == ("zk", "http://zep.local:8000")


def test_blank_values_count_as_unset_and_values_are_stripped():
    s = Settings.from_env({"TASKMON_PORT": "  ", "TASKMON_API_TOKEN": "", "TASKMON_RETRY_MS": " 250 "})
    assert s.port == 8000
    assert s.api_token is None
    assert s.retry_ms == 250


def test_secrets_stay_out_of_repr():
    s = Settings.from_env({"TASKMON_API_TOKEN": "hunter2", "TASKMON_READ_TOKEN": "r3ad", "ZEP_API_KEY": "zepkey"})
    text = repr(s)
    assert "hunter2" not in text and "r3ad" not in text and "zepkey" not in text


def test_reads_os_environ_when_no_mapping_is_given(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("TASKMON_", "ZEP_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TASKMON_PORT", "9999")
    assert Settings.from_env().port == 9999


def test_overrides_win_over_the_environment():
    env = {"TASKMON_PORT": "9000", "TASKMON_STORE": "memory://", "TASKMON_HOST": "0.0.0.0"}
    s = Settings.from_env(env, port=9001, store_url="sqlite:///x.db", host=None)
    assert s.port == 9001
    assert s.store_url == "sqlite:///x.db"
    assert s.host == "0.0.0.0"  # None means "flag not given": the environment stays


def test_an_override_is_validated_too():
    with pytest.raises(SettingsError, match="TASKMON_PORT"):
        Settings.from_env({}, port=70000)


def test_unknown_override_is_refused():
    with pytest.raises(SettingsError, match="colour"):
        Settings.from_env({}, colour="blue")


def test_with_changes_revalidates():
    s = Settings(store_url="memory://")
    assert s.with_changes(port=1234).port == 1234
    with pytest.raises(SettingsError, match="TASKMON_HISTORY"):
        s.with_changes(history=0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKMON_PORT", "abc"),
        ("TASKMON_PORT", "0x1F"),
        ("TASKMON_PORT", "80.5"),
        ("TASKMON_PORT", "0"),
        ("TASKMON_PORT", "65536"),
        ("TASKMON_PORT", "-1"),
        ("TASKMON_HEARTBEAT_S", "fast"),
        ("TASKMON_HEARTBEAT_S", "0"),
        ("TASKMON_HEARTBEAT_S", "-3"),
        ("TASKMON_HEARTBEAT_S", "nan"),
        ("TASKMON_HEARTBEAT_S", "inf"),
        ("TASKMON_RETRY_MS", "-1"),
        ("TASKMON_RETRY_MS", "1.5"),
        ("TASKMON_HISTORY", "0"),
        ("TASKMON_RETENTION_HOURS", "0"),
        ("TASKMON_RETENTION_HOURS", "-1"),
        ("TASKMON_RETENTION_HOURS", "nan"),
        ("TASKMON_RETENTION_HOURS", "inf"),
        ("TASKMON_CLEANUP_INTERVAL_S", "0"),
        ("TASKMON_CLEANUP_INTERVAL_S", "soon"),
        ("TASKMON_MAX_STREAMS", "0"),
        ("TASKMON_MAX_STREAMS", "many"),
        ("TASKMON_JOB_WORKERS", "0"),
        ("TASKMON_MAX_UPLOAD_MB", "0"),
        ("TASKMON_MAX_UPLOAD_MB", "inf"),
        ("TASKMON_MAX_UPLOAD_MB", "50MB"),
        ("TASKMON_STORE", "postgres://db/x"),
        ("TASKMON_STORE", "tasks.db"),
        ("TASKMON_STORE", "sqlite://relative-without-third-slash"),
        ("TASKMON_LOG_LEVEL", "loud"),
        ("TASKMON_ACCESS_LOG", "maybe"),
    ],
)
def test_bad_values_raise_settings_error_naming_the_variable(variable, value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert variable in str(caught.value)
    assert isinstance(caught.value, ValueError)


# -- the CLI refuses bad input quickly, with exit status 2 ---------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMON_", "ZEP_"))}
    env.update(extra)
    return env


def _taskmon(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,  # a bad input that slipped through would start serving: fail, do not hang
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--port", "0x"], {}, "--port"),
        (["serve", "--port", "0"], {}, "TASKMON_PORT"),
        (["serve", "--log-level", "loud"], {}, "--log-level"),
        (["serve", "--store", "postgres://db"], {}, "TASKMON_STORE"),
        (["serve"], {"TASKMON_HEARTBEAT_S": "often"}, "TASKMON_HEARTBEAT_S"),
        ([], {}, "command"),
        (["frobnicate"], {}, "frobnicate"),
    ],
)
def test_bad_cli_input_exits_2_with_a_message(args, env, expected):
    done = _taskmon(*args, **env)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
