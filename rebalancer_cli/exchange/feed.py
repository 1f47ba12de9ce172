"""Market data shared by every portfolio of a process: one best bid/ask read per exchange per tick, one balance
read per account per tick, whichever portfolio asks first (the others wait for that read, then use it).

The daemon's idle checks read through it: a thousand portfolios on one exchange cost one bid/ask request a tick
between them, and the portfolios on one account one balance read. With a Redis URL, bid/ask (public data) is
shared by every instance too, through a key that lives one tick. Reads for an order never come from here: a cycle
that finds something to do reads the exchange afresh (`daemon.cycle`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..snapshot import Level

if TYPE_CHECKING:
    import redis

Tops = dict[str, tuple[tuple[Level, ...], tuple[Level, ...]]]
Balances = tuple[dict[str, Decimal], dict[str, Decimal]]
DEFAULT_TICK = 1.0


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: Any = None
    read_at: float = 0.0  # monotonic time of the read
    wall: float = 0.0  # wall-clock time of the read
    symbols: frozenset[str] = frozenset()


class MarketFeed:
    """Thread-safe; `tick` is how long one read serves (seconds)."""

    def __init__(
        self,
        tick: float = DEFAULT_TICK,
        *,
        redis_client: redis.Redis | Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick = tick
        self._redis = redis_client
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, kind: str, key: str) -> _Entry:
        with self._lock:
            entry = self._entries.get((kind, key))
            if entry is None:
                entry = self._entries[(kind, key)] = _Entry()
            return entry

    def balances(self, account: str, read: Callable[[], Balances]) -> tuple[Balances, float]:
        """(free, locked) of the account and the wall time of the read."""
        entry = self._entry("balances", account)
        with entry.lock:
            if entry.value is None or self._clock() - entry.read_at >= self.tick:
                entry.value = read()
                entry.read_at, entry.wall = self._clock(), time.time()
            value: Balances = entry.value
            return value, entry.wall

    def tops(self, venue: str, symbols: Sequence[str], read: Callable[[list[str]], Tops]) -> tuple[Tops, float]:
        """Best bid and ask of `symbols` on the venue (exchange and API URL), and the wall time of the read.

        A read asks for every symbol any portfolio wanted on the venue, so the next portfolio's markets are in."""
        entry = self._entry("tops", venue)
        with entry.lock:
            fresh = entry.value is not None and self._clock() - entry.read_at < self.tick
            if not (fresh and entry.symbols.issuperset(symbols)):
                wanted = entry.symbols | frozenset(symbols)
                shared = self._from_redis(venue, wanted)
                if shared is not None:
                    entry.value, entry.wall = shared
                else:
                    entry.value = read(sorted(wanted))
                    entry.wall = time.time()
                    self._to_redis(venue, entry.value, entry.wall)
                entry.read_at, entry.symbols = self._clock(), frozenset(entry.value)
            value: Tops = entry.value
            return value, entry.wall

    # -- every instance, through Redis -------------------------------------------------------------------------

    def _key(self, venue: str) -> str:
        return f"md:{{{venue}}}:tops"

    def _from_redis(self, venue: str, wanted: frozenset[str]) -> tuple[Tops, float] | None:
        if self._redis is None:
            return None
        try:
            raw = self._redis.get(self._key(venue))
        except Exception:  # a shared cache that is down costs a request, never a cycle
            return None
        if not raw:
            return None
        doc = json.loads(raw)
        tops: Tops = {
            s: (
                tuple((Decimal(p), Decimal(a)) for p, a in sides[0]),
                tuple((Decimal(p), Decimal(a)) for p, a in sides[1]),
            )
            for s, sides in doc["tops"].items()
        }
        if not wanted.issubset(tops) or time.time() - float(doc["wall"]) >= self.tick:
            return None
        return tops, float(doc["wall"])

    def _to_redis(self, venue: str, tops: Tops, wall: float) -> None:
        if self._redis is None:
            return
        doc = {
            "wall": wall,
            "tops": {s: [[[str(p), str(a)] for p, a in side] for side in sides] for s, sides in tops.items()},
        }
        try:
            self._redis.set(self._key(venue), json.dumps(doc), px=max(1, int(self.tick * 1000)))
        except Exception:  # best effort: the next instance reads the exchange itself
            return
