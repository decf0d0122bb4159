"""Content keys of KV blocks: chained SHA-256 over (parent key, salt, token ids).

Never Python's hash(): keys must be stable across processes and restarts, and the tenant salt is
in every key so that no block computed under one tenant is ever found under another.
"""

from __future__ import annotations

import hashlib
from array import array

ROOT_KEY = b"\x00" * 32


def block_key(parent: bytes, salt: bytes, token_ids: tuple[int, ...] | list[int]) -> bytes:
    digest = hashlib.sha256(parent)
    digest.update(len(salt).to_bytes(4, "little"))
    digest.update(salt)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()

