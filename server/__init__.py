"""taskmon: real-time task progress over Server-Sent Events, with JSON snapshots for pollers."""

__version__ = "0.1.0"
