"""``taskmon``: the name producers import (``from taskmon.client import Client``); the code lives in ``server``."""

from server import __version__

__all__ = ["__version__"]
