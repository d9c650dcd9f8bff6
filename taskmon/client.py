"""``from taskmon.client import Client, AsyncClient``: the producer client (see server/client.py)."""

from server.client import (
    AsyncClient,
    AsyncTask,
    Client,
    Task,
    TaskCancelled,
    TaskmonError,
    TaskmonUnavailable,
)

__all__ = ["AsyncClient", "AsyncTask", "Client", "Task", "TaskCancelled", "TaskmonError", "TaskmonUnavailable"]
