"""Uploaded blobs (data tensors, export graphs, weights, pickles), content-addressed per tenant.

A blob is acknowledged only after its bytes hashed to the name in the URL, were flushed to
disk and renamed into place, so a truncated or corrupt upload never becomes visible. Each
tenant has its own directory: the same hash uploaded by two tenants is two blobs, and one
tenant can never learn what another uploaded.

A disk that refuses the bytes (full, read-only, failing, over quota) is the store's
`StorageUnavailable` (503 with Retry-After), not a 500. For tests, AIAAS_LAB_FAULT_STORE=PATH
(see _store) makes uploads fail as a full disk would while PATH exists.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson

from ._http import ApiError
from ._store import StorageUnavailable

__all__ = ["Blobs", "check_sha256", "safetensors_header"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT}


def check_sha256(value: str, where: str = "the URL") -> str:
    value = value.lower()
    if not _SHA256.fullmatch(value):
        raise ApiError(400, f"{where}: expected a sha256 as 64 hex digits, but found {value[:80]!r}.")
    return value


class Blobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._fault = os.environ.get("AIAAS_LAB_FAULT_STORE")

    def tenant_dir(self, tenant: str) -> Path:
        # A hash, not the name: tenant names come from the tokens file and need not be path-safe.
        return self.root / hashlib.sha256(tenant.encode()).hexdigest()[:24]

    def remove_partial(self) -> None:
        """Uploads a crash interrupted: never acknowledged, so never visible, and now deleted."""
        for path in self.root.glob("*/.*.part"):
            path.unlink(missing_ok=True)

    def find(self, tenant: str, sha256: str) -> Path | None:
        path = self.tenant_dir(tenant) / sha256
        return path if path.is_file() else None

    async def put(self, tenant: str, sha256: str, chunks: AsyncIterator[bytes]) -> tuple[int, bool]:
        """Store the streamed body; returns (size, created). Raises ApiError on a hash mismatch,
        StorageUnavailable when the disk refuses it."""
        try:
            return await self._put(tenant, sha256, chunks)
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                raise
            # strerror only: the tenant does not need the server's paths
            raise StorageUnavailable(exc.strerror or errno.errorcode.get(exc.errno or 0, "disk error")) from None

    async def _put(self, tenant: str, sha256: str, chunks: AsyncIterator[bytes]) -> tuple[int, bool]:
        directory = self.tenant_dir(tenant)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{sha256}.{secrets.token_hex(4)}.part"
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    if self._fault and os.path.exists(self._fault):
                        raise OSError(errno.ENOSPC, "No space left on device (injected: AIAAS_LAB_FAULT_STORE)")
                    hasher.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                await anyio.to_thread.run_sync(os.fsync, f.fileno())
            if hasher.hexdigest() != sha256:
                raise ApiError(400, f"the body's sha256 is {hasher.hexdigest()}, not the {sha256} in the URL; "
                                    "the upload was truncated or corrupted and was not stored.")
            final = directory / sha256
            created = not final.exists()
            os.replace(tmp, final)
            return size, created
        finally:
            tmp.unlink(missing_ok=True)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), read
    without loading any tensor. Raises ValueError when the file is not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            raise ValueError("the header length does not fit the file")
        try:  # orjson: a header nested 100,000 deep is a JSONDecodeError; json.loads recursed past the stack
            header = orjson.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)):
            raise ValueError(f"tensor {name!r} has no dtype and shape")
    return header
