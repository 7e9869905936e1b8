"""The remote backend: `aiaas-lab serve`, an ASGI app (Starlette on uvicorn) over SQLite.

/v1 trains (blobs, jobs, their events, models); /v2 serves trained models over the Open
Inference Protocol. `create_app` builds the app for tests and embedding; `serve_main` is the CLI.
"""

from ._app import ServerConfig, create_app
from ._cli import serve_main

__all__ = ["serve_main", "create_app", "ServerConfig"]
