"""The graph build job (issue 3): projects, chunking, Zep or local graph backends, live progress.

The app's lifespan calls ``build_graph_service(settings, manager, jobs)`` (stored as
``app.state.graph``; call ``.close()`` on shutdown) and mounts ``graph_routes()``.
"""

from .routes import graph_routes
from .service import GraphService, build_graph_service

__all__ = ["GraphService", "build_graph_service", "graph_routes"]
