"""The Python client of an aiaas-lab server (and of any KServe V2 server, for inference)."""

from .client import TERMINAL_STATUSES, AsyncClient, Blob, Client, ModelWeights, RemoteError

__all__ = ["Client", "AsyncClient", "RemoteError", "Blob", "ModelWeights", "TERMINAL_STATUSES"]
