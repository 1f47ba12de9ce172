"""Idempotency keys: UUIDv7, so keys sort by creation time and carry their own timestamp (the audit store
partitions by it) while staying unique across instances without coordination."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import uuid6

KeyFactory = Callable[[], str]


def new_key() -> str:
    return str(uuid6.uuid7())


def key_time_ms(key: str) -> int:
    """Unix milliseconds encoded in a UUIDv7; raises ValueError for anything else."""
    u = uuid.UUID(key)
    if u.version != 7:
        raise ValueError(f"{key} is not a UUIDv7")
    return u.int >> 80
