"""A loopback Binance spot exchange that the real `ccxt.binance` client talks to over HTTP.

Why it exists: every test of execution must run through ccxt's own signing, request building, response
parsing and error mapping, because that is where real-money bugs hide (a float where a string was
expected, a duplicate order after a timeout, an error class mapped as retryable). Mocking ccxt would test
our assumptions about ccxt instead. So this server speaks the subset of Binance's spot REST API that ccxt
uses, in Binance's documented response shapes, and the only thing a client changes is the base URL.

Behaviour modelled after Binance (and why it matters to the callers):

* HMAC-SHA256 signatures over query string + body, `X-MBX-APIKEY`, `timestamp`/`recvWindow`.
* Request weight in a sliding 60 s window (Binance's weights; `X-MBX-USED-WEIGHT-1M` on every answer),
  429 with `Retry-After` past the limit, and a 418 ban for clients that keep sending during Retry-After.
  The window slides instead of resetting on the minute so that a test never passes by luck of timing;
  a client that stays under a sliding limit stays under Binance's fixed-minute limit too. `/sapi` is
  counted separately (`X-SAPI-USED-IP-WEIGHT-1M`) and never limited, as Binance keeps a separate budget.
* MARKET orders (by `quantity` or `quoteOrderQty`) walk the snapshot's books level by level and consume
  them; the taker fee is charged in the asset received (Binance without BNB), rounded up to 8 decimals
  per fill. LIMIT orders fill against the book up to their price and the rest rests (GTC, locking the
  balance), expires (IOC) or nothing fills (FOK). Nothing else trades: resting orders never fill later.
* Filters are checked before balances, as on Binance: LOT_SIZE (minQty = stepSize = the snapshot's
  `amount_step`), NOTIONAL (MARKET orders priced at the mid, standing in for Binance's 5-minute average
  price) and PRICE_FILTER (tick size derived from the book's prices, at least 0.01).
* Client order ids: Binance documents `newClientOrderId` as "a unique id among OPEN orders ... orders
  with the same newClientOrderId can be accepted only when the previous one is filled". So by default
  (`client_order_id_scope="open"`) a repeated id is refused with -2010 "Duplicate order sent." only
  while an order with that id is open; a MARKET order that filled does NOT protect its id, and sending
  it again trades again. This is the real exchange's behaviour and the emulator keeps it on purpose:
  idempotent execution on Binance must look the order up by client order id before resending.
  `client_order_id_scope="any"` refuses every id it has seen (stricter than Binance; for experiments).
* Klines are synthesised deterministically around the current mid: each candle's log return is plus or
  minus sigma (the snapshot's daily `volatility` scaled by sqrt(interval / 1 day)), with the signs
  balanced in blocks of eight, so the realized volatility of any window of 30 or more candles is within
  a few percent of the snapshot's. The newest candle closes at the mid. No `volatility`: flat candles.

Faults are injected through `Emulator.faults` in process, or `RemoteEmulator(url).faults` (HTTP under
`/__emulator__/`) for a server started as a subprocess; see `FaultControl` for the list.

What the real ccxt 4.5 client raises for each answer (observed through this emulator, asserted in
tests/test_emulator.py; the project's error mapper relies on it):

=====================================================  ===========================================
Binance answer                                          ccxt exception class
=====================================================  ===========================================
HTTP 429, code -1003 (weight over the limit)            DDoSProtection (ccxt raises on the status
                                                        before reading the body: never
                                                        RateLimitExceeded for a 429)
HTTP 418 (IP banned)                                    DDoSProtection
HTTP 500 / 502 / 503 (not JSON)                         ExchangeNotAvailable
HTTP 504                                                RequestTimeout
connection closed without an answer                     NetworkError (exactly that class)
no answer within the client's timeout                   RequestTimeout
-1007 "Timeout waiting for response from backend..."    RequestTimeout (order status unknown)
-1013 "Filter failure: LOT_SIZE"                        InvalidOrder (ccxt matches "LOT_SIZE" in
                                                        the body first)
-1013 "Filter failure: PRICE_FILTER"                    InvalidOrder
-1013 "Filter failure: NOTIONAL"                        BadRequest (NOT InvalidOrder)
-2010 "Duplicate order sent."                           InvalidOrder
-2010 "Account has insufficient balance for ..."        InsufficientFunds
-2010 "Order would immediately match and take."        OrderImmediatelyFillable (an InvalidOrder)
-2011 "Unknown order sent." (cancel)                    OrderNotFound
-2013 "Order does not exist." (query)                   OrderNotFound
-1121 "Invalid symbol."                                 BadSymbol
-1022 "Signature for this request is not valid."        AuthenticationError
-2014 "API-key format invalid."                         AuthenticationError
-2015 "Invalid API-key, IP, or permissions ..."         AuthenticationError until a private call of
                                                        that client object has succeeded once, then
                                                        DDoSProtection (ccxt reads it as a ban)
-1021 "Timestamp ... outside of the recvWindow."        InvalidNonce (a NetworkError in ccxt)
-1100 / -1102 / -1106 / -1116 / -1117 / -1120           BadRequest
-1020 (unknown path: "This operation is not supported") BadRequest
=====================================================  ===========================================

ccxt picks Binance's spot-only error table by the URL's host (`https://api.binance.com/`), which a
loopback URL does not match; none of the codes above is in that spot-only table, so the classes are
the same against the real exchange.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import itertools
import json
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, ROUND_UP, Decimal, InvalidOperation, localcontext
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from rebalancer_cli.snapshot import Snapshot, load_snapshot

DEFAULT_API_KEY = "emulator-api-key-0123456789abcdef0123456789abcdef0123456789abcdef"
DEFAULT_SECRET = "emulator-secret-0123456789abcdef0123456789abcdef0123456789abcdef0"
CONTROL_PREFIX = "/__emulator__/"
DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60000
SAPI_WEIGHT_LIMIT = 12000

ClientOrderIdScope = Literal["open", "any"]

_EIGHT = Decimal("0.00000001")
_MIN_TICK = Decimal("0.01")
_MAX_QTY = Decimal("9000000000000")
_MAX_PRICE = Decimal("1000000000")
_MAX_NOTIONAL = Decimal("9000000000000")
_DECIMAL_RE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,20})?$")
_CLIENT_ID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")
_DAY_MS = 86_400_000
_MAX_KLINE_STEPS = 200_000

_INTERVAL_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": _DAY_MS,
    "3d": 3 * _DAY_MS,
    "1w": 7 * _DAY_MS,
}
# Binance's weekly candles open on Monday 00:00 UTC; the Unix epoch was a Thursday.
_INTERVAL_OFFSET_MS: dict[str, int] = {"1w": 4 * _DAY_MS}
# Every 8-step sign pattern with four ups and four downs: a window's mean return stays near zero, so its
# sample standard deviation stays near sigma whatever the window.
_BALANCED_BLOCKS: tuple[tuple[int, ...], ...] = tuple(
    tuple(1 if i in ups else -1 for i in range(8)) for ups in itertools.combinations(range(8), 4)
)

_AUTH_MESSAGES: dict[int, tuple[int, str]] = {
    -2014: (401, "API-key format invalid."),
    -2015: (401, "Invalid API-key, IP, or permissions for action."),
    -1022: (400, "Signature for this request is not valid."),
}
_INSUFFICIENT = "Account has insufficient balance for requested action."
_FILTER_KINDS = ("LOT_SIZE", "NOTIONAL", "PRICE_FILTER")
_AFTER_ACCEPT_MODES = ("hang", "drop", "unknown_status")


# --- errors and small helpers --------------------------------------------------------------------


class _ApiError(Exception):
    """A Binance error answer: HTTP status plus the `{"code", "msg"}` body ccxt maps to its classes."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg


def _bad(code: int, msg: str) -> _ApiError:
    return _ApiError(400, code, msg)


def _mandatory(name: str) -> _ApiError:
    return _bad(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def _fmt(value: Decimal) -> str:
    """Binance writes amounts with 8 decimals; finer values are written exactly rather than rounded."""
    if value == 0:
        return "0.00000000"
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent >= -8:
        return f"{value:.8f}"
    return f"{value.normalize():f}"


def _plain(value: Decimal) -> str:
    return f"{value.normalize():f}"


def _to_decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool | float):
        raise ValueError(f"{what} must be decimal text or Decimal, not {type(value).__name__}")
    if isinstance(value, Decimal | int | str):
        try:
            result = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"{what} is not a number: {value!r}") from None
        if not result.is_finite():
            raise ValueError(f"{what} must be finite")
        return result
    raise ValueError(f"{what} must be decimal text or Decimal")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _floor_to(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step


def _commission(amount: Decimal, rate: Decimal) -> Decimal:
    fee = amount * rate
    rounded = fee.quantize(_EIGHT, rounding=ROUND_UP)
    return fee if rounded == fee else rounded


def _param_decimal(params: dict[str, str], name: str) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _DECIMAL_RE.match(raw):
        raise _bad(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^([0-9]{{1,20}})(\\.[0-9]{{1,20}})?$'.",
        )
    return Decimal(raw)


def _param_int(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.lstrip("-").isdigit():
        raise _bad(-1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.")
    return int(raw)


# --- exchange state ------------------------------------------------------------------------------


@dataclass
class _Market:
    symbol: str  # unified, e.g. BTC/USDC
    id: str  # Binance, e.g. BTCUSDC
    base: str
    quote: str
    taker_fee: Decimal
    step: Decimal
    min_notional: Decimal
    bids: list[list[Decimal]]  # best first, [price, amount], mutated as orders consume depth
    asks: list[list[Decimal]]
    volatility: Decimal | None
    tick: Decimal
    reference: Decimal  # the mid, kept when a side of the book is emptied
    last_price: Decimal | None = None

    def mid(self) -> Decimal:
        if self.bids and self.asks:
            return (self.bids[0][0] + self.asks[0][0]) / 2
        return self.reference


@dataclass
class _Trade:
    id: int
    order_id: int
    symbol_id: str
    price: Decimal
    qty: Decimal
    commission: Decimal
    commission_asset: str
    time: int
    is_buyer: bool
    is_maker: bool = False

    @property
    def quote_qty(self) -> Decimal:
        return self.price * self.qty


@dataclass
class _Order:
    order_id: int
    client_order_id: str
    symbol_id: str
    side: str
    type: str
    time_in_force: str
    price: Decimal
    orig_qty: Decimal
    orig_quote_qty: Decimal
    time: int
    update_time: int
    executed_qty: Decimal = Decimal(0)
    cum_quote: Decimal = Decimal(0)
    status: str = "NEW"
    fills: list[_Trade] = field(default_factory=list)
    locked_asset: str = ""
    locked: Decimal = Decimal(0)

    @property
    def is_open(self) -> bool:
        return self.status in ("NEW", "PARTIALLY_FILLED")


@dataclass
class _Balance:
    free: Decimal
    locked: Decimal = Decimal(0)


class _WeightWindow:
    """Request weight spent in the last `window` seconds (a sliding window, see the module docstring)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._entries: deque[tuple[float, int]] = deque()
        self._used = 0

    def _prune(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.window:
            self._used -= self._entries.popleft()[1]

    def used(self, now: float) -> int:
        self._prune(now)
        return self._used

    def fits(self, now: float, weight: int) -> bool:
        return self.used(now) + weight <= self.limit

    def wait_for(self, now: float, weight: int) -> float:
        """Seconds until `weight` more fits: the honest Retry-After."""
        self._prune(now)
        excess = self._used + weight - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for stamp, spent in self._entries:
            freed += spent
            if freed >= excess:
                return max(0.0, stamp + self.window - now)
        return self.window

    def add(self, now: float, weight: int) -> None:
        self._entries.append((now, weight))
        self._used += weight

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0


# --- faults --------------------------------------------------------------------------------------

FAULT_KINDS = (
    "latency",
    "timeout_after_accept",
    "http_5xx",
    "drop_connection",
    "insufficient_balance",
    "filter_failure",
    "reject_auth",
)


@dataclass
class Fault:
    """One armed fault; `remaining` None means every matching request until the faults are cleared."""

    kind: str
    endpoint: str | None = None
    method: str | None = None
    remaining: int | None = 1
    params: dict[str, Any] = field(default_factory=dict)

    def matches(self, method: str, path: str) -> bool:
        return (self.endpoint is None or self.endpoint == path) and (self.method is None or self.method == method)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "endpoint": self.endpoint,
            "method": self.method,
            "remaining": self.remaining,
            **self.params,
        }


def _validated_fault(
    kind: str, endpoint: str | None, method: str | None, count: int | None, params: dict[str, Any]
) -> Fault:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError("count must be a positive integer, or None for every matching request")
    if endpoint is not None and not endpoint.startswith("/"):
        raise ValueError("endpoint is a path such as /api/v3/order")
    method = method.upper() if method else None
    clean: dict[str, Any] = {}
    if kind == "latency":
        clean["ms"] = float(params.get("ms", 0))
        if clean["ms"] < 0:
            raise ValueError("latency ms must be at least 0")
    elif kind == "timeout_after_accept":
        clean["mode"] = str(params.get("mode", "hang"))
        clean["hang_seconds"] = float(params.get("hang_seconds", 30.0))
        if clean["mode"] not in _AFTER_ACCEPT_MODES:
            raise ValueError(f"mode must be one of {', '.join(_AFTER_ACCEPT_MODES)}")
    elif kind == "http_5xx":
        clean["status"] = int(params.get("status", 503))
        if not 500 <= clean["status"] <= 599:
            raise ValueError("status must be a 5xx HTTP status")
    elif kind == "filter_failure":
        clean["filter"] = str(params.get("filter", "LOT_SIZE"))
        if clean["filter"] not in _FILTER_KINDS:
            raise ValueError(f"filter must be one of {', '.join(_FILTER_KINDS)}")
    elif kind == "reject_auth":
        clean["code"] = int(params.get("code", -2015))
        if clean["code"] not in _AUTH_MESSAGES:
            raise ValueError(f"code must be one of {sorted(_AUTH_MESSAGES)}")
    unknown = set(params) - set(clean)
    if unknown:
        raise ValueError(f"unknown parameters for fault {kind}: {', '.join(sorted(unknown))}")
    if kind in ("insufficient_balance", "filter_failure"):
        endpoint, method = endpoint or "/api/v3/order", method or "POST"
    return Fault(kind=kind, endpoint=endpoint, method=method, remaining=count, params=clean)


class FaultControl:
    """The faults a test can arm; the same methods work in process (`Faults`) and over HTTP (`RemoteFaults`).

    `endpoint` is a request path (`/api/v3/order`), `method` an HTTP method; both default to any. `count`
    is how many matching requests the fault hits, None for all of them until `clear()`.
    """

    def add(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        method: str | None = None,
        count: int | None = 1,
        **params: Any,
    ) -> None:
        raise NotImplementedError

    def rate_limit(self, limit: int) -> None:
        """Set the request-weight limit per minute (Binance: 6000)."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def latency(
        self, ms: float, *, endpoint: str | None = None, method: str | None = None, count: int | None = None
    ) -> None:
        """Answer `ms` milliseconds late (the request still runs)."""
        self.add("latency", endpoint=endpoint, method=method, count=count, ms=ms)

    def timeout_after_accept(
        self,
        *,
        count: int | None = 1,
        mode: str = "hang",
        hang_seconds: float = 30.0,
        endpoint: str | None = "/api/v3/order",
        method: str | None = "POST",
    ) -> None:
        """Execute the request (place and fill the order), then never answer it.

        `hang`: hold the connection `hang_seconds` (longer than the client's timeout) and close it;
        `drop`: close it at once; `unknown_status`: answer -1007, Binance's "execution status unknown".
        """
        self.add(
            "timeout_after_accept",
            endpoint=endpoint,
            method=method,
            count=count,
            mode=mode,
            hang_seconds=hang_seconds,
        )

    def http_5xx(
        self,
        count: int | None = 1,
        *,
        status: int = 503,
        endpoint: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer `status` without running the request, as a failing gateway does."""
        self.add("http_5xx", endpoint=endpoint, method=method, count=count, status=status)

    def drop_connection(self, count: int | None = 1, *, endpoint: str | None = None, method: str | None = None) -> None:
        """Close the connection without running the request or answering it."""
        self.add("drop_connection", endpoint=endpoint, method=method, count=count)

    def insufficient_balance(self, count: int | None = 1) -> None:
        """Refuse the next new order(s) with -2010 insufficient balance, whatever the balances."""
        self.add("insufficient_balance", count=count)

    def filter_failure(self, filter: str = "LOT_SIZE", count: int | None = 1) -> None:
        """Refuse the next new order(s) with -1013 "Filter failure: <filter>"."""
        self.add("filter_failure", count=count, filter=filter)

    def reject_auth(self, count: int | None = None, *, code: int = -2015, endpoint: str | None = None) -> None:
        """Refuse signed requests as if the key were revoked (-2015), malformed (-2014) or badly signed (-1022)."""
        self.add("reject_auth", endpoint=endpoint, count=count, code=code)


class Faults(FaultControl):
    """Faults of an in-process emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator
        self._faults: list[Fault] = []

    def add(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        method: str | None = None,
        count: int | None = 1,
        **params: Any,
    ) -> None:
        fault = _validated_fault(kind, endpoint, method, count, params)
        with self._emulator._lock:
            self._faults.append(fault)

    def rate_limit(self, limit: int) -> None:
        self._emulator.set_weight_limit(limit)

    def clear(self) -> None:
        with self._emulator._lock:
            self._faults.clear()

    def active(self) -> list[dict[str, Any]]:
        with self._emulator._lock:
            return [f.as_dict() for f in self._faults]

    def _take(self, kind: str, method: str, path: str) -> Fault | None:
        """The first armed fault of `kind` matching the request, counted down (caller holds the lock)."""
        for fault in self._faults:
            if fault.kind == kind and fault.matches(method, path):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None


# --- the emulator --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    params: dict[str, str]


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b"{}"
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json;charset=UTF-8"
    action: Literal["send", "drop", "hang"] = "send"
    hang_seconds: float = 0.0


@dataclass(frozen=True)
class _Route:
    handler: Callable[[Emulator, _Request], Any]
    weight: Callable[[dict[str, str]], int]
    signed: bool = False
    budget: Literal["api", "sapi"] = "api"


def _const(weight: int) -> Callable[[dict[str, str]], int]:
    return lambda _params: weight


def _depth_weight(params: dict[str, str]) -> int:
    try:
        limit = int(params.get("limit", "100"))
    except ValueError:
        return 5
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


def _symbols_count(params: dict[str, str]) -> int | None:
    try:
        symbols = json.loads(params["symbols"])
    except (KeyError, ValueError):
        return None
    return len(symbols) if isinstance(symbols, list) else None


def _ticker_24hr_weight(params: dict[str, str]) -> int:
    if "symbol" in params:
        return 2
    count = _symbols_count(params)
    if count is None:
        return 80
    return 2 if count <= 20 else 40 if count <= 100 else 80


def _one_or_all_weight(one: int, many: int) -> Callable[[dict[str, str]], int]:
    return lambda params: one if "symbol" in params else many


class Emulator:
    """A running loopback exchange; start it with `start_emulator`. Thread-safe."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        weight_limit: int = 6000,
        weight_window: float = 60.0,
        api_key: str = DEFAULT_API_KEY,
        secret: str = DEFAULT_SECRET,
        client_order_id_scope: ClientOrderIdScope = "open",
        ban_after: int = 3,
        ban_seconds: float = 120.0,
    ) -> None:
        if client_order_id_scope not in ("open", "any"):
            raise ValueError("client_order_id_scope must be 'open' (Binance) or 'any'")
        self._snapshot = snapshot
        self._api_key = api_key
        self._secret = secret.encode()
        self._client_order_id_scope = client_order_id_scope
        self._initial_weight_limit = weight_limit
        self._ban_after = ban_after
        self._ban_seconds = ban_seconds
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self.faults = Faults(self)
        self._api_window = _WeightWindow(weight_limit, weight_window)
        self._sapi_window = _WeightWindow(SAPI_WEIGHT_LIMIT, weight_window)
        self._next_order_id = 1
        self._next_trade_id = 1
        self._load_state()
        self._server = _Server((host, port), self)
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Emulator:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"binance-emulator-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake hung requests and close every open connection."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- state ---------------------------------------------------------------------------------

    def _load_state(self) -> None:
        markets: dict[str, _Market] = {}
        by_symbol: dict[str, _Market] = {}
        for symbol, m in self._snapshot.markets.items():
            bids = [[p, a] for p, a in m.bids]
            asks = [[p, a] for p, a in m.asks]
            market = _Market(
                symbol=symbol,
                id=f"{m.base}{m.quote}",
                base=m.base,
                quote=m.quote,
                taker_fee=m.taker_fee,
                step=m.amount_step,
                min_notional=m.min_notional,
                bids=bids,
                asks=asks,
                volatility=m.volatility,
                tick=_tick_for(bids, asks, _MIN_TICK),
                reference=m.mid,
            )
            if market.id in markets:
                raise ValueError(f"markets {markets[market.id].symbol} and {symbol} share the id {market.id}")
            markets[market.id] = market
            by_symbol[symbol] = market
        balances: dict[str, _Balance] = {}
        for asset, amount in self._snapshot.balances.items():
            balances[asset] = _Balance(free=amount, locked=Decimal(0))
        for asset, amount in self._snapshot.locked.items():
            balances.setdefault(asset, _Balance(free=Decimal(0))).locked = amount
        for market in markets.values():
            balances.setdefault(market.base, _Balance(free=Decimal(0)))
            balances.setdefault(market.quote, _Balance(free=Decimal(0)))
        self._markets = markets
        self._by_symbol = by_symbol
        self._balances = balances
        self._orders: dict[int, _Order] = {}
        self._trades: list[_Trade] = []
        self._balance_update_ms = _now_ms()
        self._requests: Counter[str] = Counter()
        self._order_counts: dict[str, Counter[str]] = {}
        self._order_stamps: deque[float] = deque()
        self._counters: Counter[str] = Counter()
        self._weight_total = 0
        self._backoff_until = 0.0
        self._strikes = 0
        self._banned_until = 0.0
        self._fee_asset: tuple[str, Decimal] | None = None

    def reset(self) -> None:
        """Back to the snapshot: balances, books, orders, counters, faults and weight. Ids keep growing."""
        with self._lock:
            self._load_state()
            self.faults._faults.clear()
            self._api_window.limit = self._initial_weight_limit
            self._api_window.clear()
            self._sapi_window.clear()

    def set_weight_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the weight limit must be at least 1")
        with self._lock:
            self._api_window.limit = int(limit)

    def set_balance(self, asset: str, amount: Decimal | str | int) -> None:
        """Set the free balance of `asset` (locked amounts stay)."""
        value = _to_decimal(amount, "amount")
        if value < 0:
            raise ValueError("a balance cannot be negative")
        with self._lock:
            self._balances.setdefault(asset, _Balance(free=Decimal(0))).free = value
            self._balance_update_ms = _now_ms()

    def set_book(
        self,
        symbol: str,
        bids: Iterable[Sequence[Decimal | str | int]],
        asks: Iterable[Sequence[Decimal | str | int]],
    ) -> None:
        """Replace a market's book; `symbol` as BTC/USDC or BTCUSDC, levels best first as [price, amount]."""
        new_bids = _levels(bids, descending=True)
        new_asks = _levels(asks, descending=False)
        if new_bids and new_asks and new_bids[0][0] >= new_asks[0][0]:
            raise ValueError("crossed book: the best bid must be below the best ask")
        with self._lock:
            market = self._by_symbol.get(symbol) or self._markets.get(symbol)
            if market is None:
                raise ValueError(f"unknown market {symbol}")
            market.bids, market.asks = new_bids, new_asks
            market.tick = _tick_for(new_bids, new_asks, market.tick)
            if new_bids and new_asks:
                market.reference = (new_bids[0][0] + new_asks[0][0]) / 2

    def set_fee_asset(self, asset: str | None, price: Decimal | str | int = 1) -> None:
        """Charge taker fees in `asset` (as Binance does with BNB), converted at `price` quote per unit of it.

        The fee is the commission on the fill's quote value divided by `price`, rounded up to 8 decimals; when
        the account holds too little of `asset` the fee falls back to the asset received, as on Binance.
        `None` restores the default.
        """
        value = _to_decimal(price, "price")
        if value <= 0:
            raise ValueError("the fee asset's price must be positive")
        with self._lock:
            self._fee_asset = (asset, value) if asset else None

    def free(self, asset: str) -> Decimal:
        with self._lock:
            balance = self._balances.get(asset)
            return balance.free if balance else Decimal(0)

    def locked(self, asset: str) -> Decimal:
        with self._lock:
            balance = self._balances.get(asset)
            return balance.locked if balance else Decimal(0)

    def stats(self) -> dict[str, Any]:
        """Counters for tests, JSON-ready (also GET /__emulator__/stats)."""
        with self._lock:
            now = time.monotonic()
            return {
                "requests": dict(self._requests),
                "requests_total": sum(self._requests.values()),
                "weight_total": self._weight_total,
                "weight_used_1m": self._api_window.used(now),
                "weight_limit": self._api_window.limit,
                "rate_limited_429": self._counters["429"],
                "banned_418": self._counters["418"],
                "http_5xx": self._counters["5xx"],
                "dropped": self._counters["dropped"],
                "timeouts_after_accept": self._counters["after_accept"],
                "orders": {cid: dict(c) for cid, c in self._order_counts.items()},
                "orders_accepted": len(self._orders),
                "trades": len(self._trades),
                "faults": [f.as_dict() for f in self.faults._faults],
            }

    def state(self) -> dict[str, Any]:
        """Balances, books and open orders as decimal strings (also GET /__emulator__/state)."""
        with self._lock:
            return {
                "balances": {
                    asset: {"free": _plain(b.free), "locked": _plain(b.locked)} for asset, b in self._balances.items()
                },
                "books": {
                    m.symbol: {
                        "bids": [[_plain(p), _plain(a)] for p, a in m.bids],
                        "asks": [[_plain(p), _plain(a)] for p, a in m.asks],
                    }
                    for m in self._markets.values()
                },
                "open_orders": [o.client_order_id for o in self._orders.values() if o.is_open],
            }

    # --- request pipeline ----------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def handle(self, method: str, target: str, api_key: str | None, body: bytes) -> _Reply:
        split = urlsplit(target)
        path, raw_query = split.path, split.query
        raw_body = body.decode("utf-8", "replace")
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path[len(CONTROL_PREFIX) :], raw_body)
        with self._lock:
            self._requests[f"{method} {path}"] += 1
            if self.faults._take("drop_connection", method, path):
                self._counters["dropped"] += 1
                return _Reply(action="drop")
            latency = self.faults._take("latency", method, path)
        if latency is not None:
            self._wait(float(latency.params["ms"]) / 1000)
        with self._lock, localcontext() as ctx:
            ctx.prec = 60
            return self._handle_locked(method, path, raw_query, raw_body, api_key)

    def _handle_locked(self, method: str, path: str, raw_query: str, raw_body: str, api_key: str | None) -> _Reply:
        failure = self.faults._take("http_5xx", method, path)
        if failure is not None:
            self._counters["5xx"] += 1
            status = int(failure.params["status"])
            page = f"<html><body><h1>{status} Service Unavailable</h1></body></html>"
            return _Reply(status=status, body=page.encode(), content_type="text/html")
        route = _ROUTES.get((method, path))
        params = dict(parse_qsl(raw_query, keep_blank_values=True))
        params.update(parse_qsl(raw_body, keep_blank_values=True))
        weight = route.weight(params) if route else 1
        budget = route.budget if route else "api"
        window = self._sapi_window if budget == "sapi" else self._api_window
        header = "X-SAPI-USED-IP-WEIGHT-1M" if budget == "sapi" else "X-MBX-USED-WEIGHT-1M"
        now = time.monotonic()
        refused = self._rate_check(window, header, weight, now) if budget == "api" else None
        if refused is not None:
            return refused
        window.add(now, weight)
        self._weight_total += weight
        headers = [(header, str(window.used(now)))]
        after = None
        try:
            if route is None:
                raise _ApiError(404, -1020, f"This operation is not supported: {method} {path}")
            if route.signed:
                self._authenticate(method, path, raw_query, raw_body, params, api_key)
            payload = route.handler(self, _Request(method, path, params))
            status = 200
        except _ApiError as exc:
            status, payload = exc.status, {"code": exc.code, "msg": exc.msg}
        if route is not None:
            after = self.faults._take("timeout_after_accept", method, path)
        if method == "POST" and path == "/api/v3/order":
            headers += self._order_count_headers(now)
        if after is not None:
            self._counters["after_accept"] += 1
            mode = after.params["mode"]
            if mode == "drop":
                return _Reply(action="drop")
            if mode == "hang":
                return _Reply(action="hang", hang_seconds=float(after.params["hang_seconds"]))
            status = 408
            payload = {
                "code": -1007,
                "msg": "Timeout waiting for response from backend server. "
                "Send status unknown; execution status unknown.",
            }
        body = json.dumps(payload, separators=(",", ":")).encode()
        return _Reply(status=status, body=body, headers=headers)

    def _rate_check(self, window: _WeightWindow, header: str, weight: int, now: float) -> _Reply | None:
        """429 past the limit, 418 for whoever keeps sending during Retry-After (Binance's IP ban)."""
        if now < self._banned_until:
            return self._ban_reply(window, header, now)
        if now < self._backoff_until:
            self._strikes += 1
            if self._strikes >= self._ban_after:
                self._banned_until = now + self._ban_seconds
                return self._ban_reply(window, header, now)
        if window.fits(now, weight):
            if now >= self._backoff_until:
                self._strikes = 0
            return None
        wait = window.wait_for(now, weight)
        retry_after = max(1, int(-(-wait // 1)))
        self._backoff_until = max(self._backoff_until, now + wait)
        self._counters["429"] += 1
        body = {
            "code": -1003,
            "msg": f"Too much request weight used; current limit is {window.limit} request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        }
        return _Reply(
            status=429,
            body=json.dumps(body, separators=(",", ":")).encode(),
            headers=[(header, str(window.used(now))), ("Retry-After", str(retry_after))],
        )

    def _ban_reply(self, window: _WeightWindow, header: str, now: float) -> _Reply:
        self._counters["418"] += 1
        remaining = self._banned_until - now
        until_ms = _now_ms() + int(remaining * 1000)
        body = {
            "code": -1003,
            "msg": f"Way too much request weight used; IP banned until {until_ms}. "
            "Please use WebSocket Streams for live updates to avoid bans.",
        }
        return _Reply(
            status=418,
            body=json.dumps(body, separators=(",", ":")).encode(),
            headers=[(header, str(window.used(now))), ("Retry-After", str(max(1, int(-(-remaining // 1)))))],
        )

    def _order_count_headers(self, now: float) -> list[tuple[str, str]]:
        while self._order_stamps and self._order_stamps[0] <= now - 86400:
            self._order_stamps.popleft()
        last_10s = sum(1 for stamp in self._order_stamps if stamp > now - 10)
        return [("X-MBX-ORDER-COUNT-10S", str(last_10s)), ("X-MBX-ORDER-COUNT-1D", str(len(self._order_stamps)))]

    def _authenticate(
        self,
        method: str,
        path: str,
        raw_query: str,
        raw_body: str,
        params: dict[str, str],
        api_key: str | None,
    ) -> None:
        forced = self.faults._take("reject_auth", method, path)
        if forced is not None:
            status, msg = _AUTH_MESSAGES[int(forced.params["code"])]
            raise _ApiError(status, int(forced.params["code"]), msg)
        if not api_key:
            raise _ApiError(401, -2014, "API-key format invalid.")
        if not hmac.compare_digest(api_key.encode(), self._api_key.encode()):
            raise _ApiError(401, -2015, "Invalid API-key, IP, or permissions for action.")
        timestamp = _param_int(params, "timestamp")
        if timestamp is None:
            raise _mandatory("timestamp")
        recv_window = _param_decimal(params, "recvWindow")
        window_ms = DEFAULT_RECV_WINDOW_MS if recv_window is None else recv_window
        if window_ms > MAX_RECV_WINDOW_MS:
            raise _bad(-1131, "recvWindow must be less than 60000")
        now = _now_ms()
        if timestamp >= now + 1000:
            raise _bad(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
        if now - timestamp > window_ms:
            raise _bad(-1021, "Timestamp for this request is outside of the recvWindow.")
        signature = params.get("signature")
        if not signature:
            raise _mandatory("signature")
        payload = _without_signature(raw_query) + _without_signature(raw_body)
        expected = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature.lower()):
            raise _bad(-1022, "Signature for this request is not valid.")

    # --- control API ---------------------------------------------------------------------------

    def _control(self, method: str, action: str, raw_body: str) -> _Reply:
        try:
            doc: Any = json.loads(raw_body) if raw_body.strip() else {}
            if not isinstance(doc, dict):
                raise ValueError("the body must be a JSON object")
            result: Any = {"ok": True}
            if method == "GET" and action == "stats":
                result = self.stats()
            elif method == "GET" and action == "state":
                result = self.state()
            elif method == "POST" and action == "faults":
                kind = doc.pop("kind", None)
                if not isinstance(kind, str):
                    raise ValueError("a fault needs a 'kind'")
                if kind == "rate_limit":
                    self.set_weight_limit(int(doc["limit"]))
                else:
                    self.faults.add(
                        kind,
                        endpoint=doc.pop("endpoint", None),
                        method=doc.pop("method", None),
                        count=doc.pop("count", 1),
                        **doc,
                    )
            elif method == "DELETE" and action == "faults":
                self.faults.clear()
            elif method == "POST" and action == "rate_limit":
                self.set_weight_limit(int(doc["limit"]))
            elif method == "POST" and action == "balance":
                self.set_balance(str(doc["asset"]), str(doc["amount"]))
            elif method == "POST" and action == "book":
                self.set_book(str(doc["symbol"]), doc.get("bids", []), doc.get("asks", []))
            elif method == "POST" and action == "reset":
                self.reset()
            else:
                return _Reply(status=404, body=json.dumps({"error": f"no control {method} {action}"}).encode())
        except (KeyError, TypeError, ValueError) as exc:
            return _Reply(status=400, body=json.dumps({"error": str(exc)}).encode())
        return _Reply(body=json.dumps(result, separators=(",", ":")).encode())

    # --- market data ---------------------------------------------------------------------------

    def _market(self, params: dict[str, str], name: str = "symbol") -> _Market:
        symbol = params.get(name)
        if not symbol:
            raise _mandatory(name)
        market = self._markets.get(symbol)
        if market is None:
            raise _bad(-1121, "Invalid symbol.")
        return market

    def _markets_param(self, params: dict[str, str]) -> list[_Market]:
        """`symbol=X`, `symbols=["X","Y"]` or neither (all markets)."""
        if "symbol" in params:
            return [self._market(params)]
        if "symbols" in params:
            try:
                ids = json.loads(params["symbols"])
            except ValueError:
                raise _bad(-1100, "Illegal characters found in parameter 'symbols'.") from None
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise _bad(-1100, "Illegal characters found in parameter 'symbols'.")
            if len(set(ids)) != len(ids):
                raise _bad(-1151, "Symbol is present multiple times in the list.")
            return [self._market({"symbol": i}) for i in ids]
        return list(self._markets.values())

    def _ping(self, req: _Request) -> Any:
        return {}

    def _time(self, req: _Request) -> Any:
        return {"serverTime": _now_ms()}

    def _system_status(self, req: _Request) -> Any:
        return {"status": 0, "msg": "normal"}

    def _exchange_info(self, req: _Request) -> Any:
        markets = self._markets_param(req.params)
        return {
            "timezone": "UTC",
            "serverTime": _now_ms(),
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": self._api_window.limit,
                },
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": [_symbol_info(m) for m in markets],
        }

    def _depth(self, req: _Request) -> Any:
        market = self._market(req.params)
        limit = _param_int(req.params, "limit") or 100
        limit = max(1, min(limit, 5000))
        return {
            "lastUpdateId": self._next_trade_id + self._next_order_id,
            "bids": [[_fmt(p), _fmt(a)] for p, a in market.bids[:limit]],
            "asks": [[_fmt(p), _fmt(a)] for p, a in market.asks[:limit]],
        }

    def _book_ticker(self, req: _Request) -> Any:
        rows = [_book_row(m) for m in self._markets_param(req.params)]
        return rows[0] if "symbol" in req.params else rows

    def _ticker_price(self, req: _Request) -> Any:
        rows = [{"symbol": m.id, "price": _fmt(_last(m))} for m in self._markets_param(req.params)]
        return rows[0] if "symbol" in req.params else rows

    def _ticker_24hr(self, req: _Request) -> Any:
        now = _now_ms()
        rows = []
        for m in self._markets_param(req.params):
            last = _last(m)
            book = _book_row(m)
            volume = _book_volume(m)
            rows.append(
                {
                    "symbol": m.id,
                    "priceChange": "0.00000000",
                    "priceChangePercent": "0.000",
                    "weightedAvgPrice": _fmt(last),
                    "prevClosePrice": _fmt(last),
                    "lastPrice": _fmt(last),
                    "lastQty": "0.00000000",
                    **{k: v for k, v in book.items() if k != "symbol"},
                    "openPrice": _fmt(last),
                    "highPrice": book["askPrice"] if m.asks else _fmt(last),
                    "lowPrice": book["bidPrice"] if m.bids else _fmt(last),
                    "volume": _fmt(volume),
                    "quoteVolume": _fmt((volume * last).quantize(_EIGHT)),
                    "openTime": now - _DAY_MS,
                    "closeTime": now,
                    "firstId": -1,
                    "lastId": -1,
                    "count": 0,
                }
            )
        return rows[0] if "symbol" in req.params else rows

    def _klines(self, req: _Request) -> Any:
        market = self._market(req.params)
        interval = req.params.get("interval")
        if not interval:
            raise _mandatory("interval")
        if interval not in _INTERVAL_MS:
            raise _bad(-1120, "Invalid interval.")
        limit = _param_int(req.params, "limit") or 500
        limit = max(1, min(limit, 1000))
        start = _param_int(req.params, "startTime")
        end = _param_int(req.params, "endTime")
        return _synthetic_klines(market, interval, limit, start, end, _now_ms())

    # --- account -------------------------------------------------------------------------------

    def _account_fee(self) -> Decimal:
        """Binance has one account commission; the most common market fee stands for it."""
        fees = Counter(m.taker_fee for m in self._markets.values())
        if not fees:
            return Decimal("0.001")
        best = max(fees.values())
        return max(fee for fee, n in fees.items() if n == best)

    def _account(self, req: _Request) -> Any:
        fee = self._account_fee()
        bps = int((fee * 10000).to_integral_value())
        omit_zero = req.params.get("omitZeroBalances", "false").lower() == "true"
        return {
            "makerCommission": bps,
            "takerCommission": bps,
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": {
                "maker": _fmt(fee),
                "taker": _fmt(fee),
                "buyer": "0.00000000",
                "seller": "0.00000000",
            },
            "canTrade": True,
            "canWithdraw": True,
            "canDeposit": True,
            "brokered": False,
            "requireSelfTradePrevention": False,
            "preventSor": False,
            "updateTime": self._balance_update_ms,
            "accountType": "SPOT",
            "balances": [
                {"asset": asset, "free": _fmt(b.free), "locked": _fmt(b.locked)}
                for asset, b in self._balances.items()
                if not (omit_zero and b.free == 0 and b.locked == 0)
            ],
            "permissions": ["SPOT"],
            "uid": 1,
        }

    def _trade_fee(self, req: _Request) -> Any:
        markets = [self._market(req.params)] if "symbol" in req.params else list(self._markets.values())
        return [
            {"symbol": m.id, "makerCommission": _plain(m.taker_fee), "takerCommission": _plain(m.taker_fee)}
            for m in markets
        ]

    # --- orders --------------------------------------------------------------------------------

    def _count(self, client_order_id: str, what: str) -> None:
        counts = self._order_counts.setdefault(
            client_order_id, Counter({"accepted": 0, "filled": 0, "rejected": 0, "duplicates": 0})
        )
        counts[what] += 1

    def _new_order(self, req: _Request) -> Any:
        return self._place(req.params, test=False)

    def _test_order(self, req: _Request) -> Any:
        return self._place(req.params, test=True)

    def _place(self, params: dict[str, str], *, test: bool) -> Any:
        market = self._market(params)
        client_order_id = params.get("newClientOrderId") or _generated_client_id(self._next_order_id)
        if not _CLIENT_ID_RE.match(client_order_id):
            raise _bad(
                -1100,
                "Illegal characters found in parameter 'newClientOrderId'; "
                "legal range is '^[\\.A-Z\\:/a-z0-9_-]{1,36}$'.",
            )
        try:
            order = self._validate_and_execute(market, client_order_id, params, test=test)
        except _ApiError as exc:
            if not test:
                self._count(client_order_id, "duplicates" if exc.msg == "Duplicate order sent." else "rejected")
            raise
        if order is None:
            return {}
        return _order_reply(order, market, params.get("newOrderRespType") or "FULL")

    def _validate_and_execute(
        self, market: _Market, client_order_id: str, params: dict[str, str], *, test: bool
    ) -> _Order | None:
        side = params.get("side")
        if not side:
            raise _mandatory("side")
        if side not in ("BUY", "SELL"):
            raise _bad(-1117, "Invalid side.")
        order_type = params.get("type")
        if not order_type:
            raise _mandatory("type")
        if order_type not in ("MARKET", "LIMIT", "LIMIT_MAKER"):
            raise _bad(-1116, "Invalid orderType.")
        resp_type = params.get("newOrderRespType") or "FULL"
        if resp_type not in ("ACK", "RESULT", "FULL"):
            raise _bad(-1136, "Invalid newOrderRespType.")
        quantity = _param_decimal(params, "quantity")
        quote_qty = _param_decimal(params, "quoteOrderQty")
        price = _param_decimal(params, "price")
        tif = params.get("timeInForce") or ""
        if order_type == "MARKET":
            if quantity is None and quote_qty is None:
                raise _bad(-1102, "Param 'quantity' or 'quoteOrderQty' must be sent, but both were empty/null!")
            if quantity is not None and quote_qty is not None:
                raise _bad(-1106, "Parameter 'quoteOrderQty' sent when not required.")
            if price is not None:
                raise _bad(-1106, "Parameter 'price' sent when not required.")
            if tif:
                raise _bad(-1106, "Parameter 'timeInForce' sent when not required.")
        else:
            if quantity is None:
                raise _mandatory("quantity")
            if price is None:
                raise _mandatory("price")
            if quote_qty is not None:
                raise _bad(-1106, "Parameter 'quoteOrderQty' sent when not required.")
            if order_type == "LIMIT" and not tif:
                raise _mandatory("timeInForce")
            if order_type == "LIMIT" and tif not in ("GTC", "IOC", "FOK"):
                raise _bad(-1115, "Invalid timeInForce.")
            if order_type == "LIMIT_MAKER" and tif:
                raise _bad(-1106, "Parameter 'timeInForce' sent when not required.")
        forced = self.faults._take("filter_failure", "POST", "/api/v3/order")
        if forced is not None:
            raise _bad(-1013, f"Filter failure: {forced.params['filter']}")
        if price is not None and (price < market.tick or price > _MAX_PRICE or price % market.tick):
            raise _bad(-1013, "Filter failure: PRICE_FILTER")
        # the quantity a market order by quote amount would execute, found by walking the book
        levels = market.asks if side == "BUY" else market.bids
        if quote_qty is not None:
            quantity = _floor_to(_qty_for_quote(levels, quote_qty), market.step)
        assert quantity is not None
        _check_lot_size(market, quantity)
        notional = quote_qty if quote_qty is not None else quantity * (price if price is not None else market.mid())
        if notional < market.min_notional or notional > _MAX_NOTIONAL:
            raise _bad(-1013, "Filter failure: NOTIONAL")
        limit_price = price
        if order_type == "LIMIT_MAKER" and levels and _crosses(side, price, levels[0][0]):
            raise _bad(-2010, "Order would immediately match and take.")
        fills = [] if order_type == "LIMIT_MAKER" else _walk(levels, quantity, side, limit_price)
        if order_type == "LIMIT" and tif == "FOK" and sum(q for _, q in fills) < quantity:
            fills = []
        if not test and any(
            o.client_order_id == client_order_id and (o.is_open or self._client_order_id_scope == "any")
            for o in self._orders.values()
        ):
            raise _bad(-2010, "Duplicate order sent.")
        base, quote = self._balances[market.base], self._balances[market.quote]
        if side == "BUY":
            if order_type == "MARKET":
                need = quote_qty if quote_qty is not None else sum(p * q for p, q in fills)
            else:
                assert price is not None
                need = price * quantity
            short = quote.free < need
        else:
            short = base.free < quantity
        if self.faults._take("insufficient_balance", "POST", "/api/v3/order") is not None or short:
            raise _bad(-2010, _INSUFFICIENT)
        if test:
            return None
        return self._execute(market, client_order_id, side, order_type, tif, price, quantity, quote_qty, fills)

    def _execute(
        self,
        market: _Market,
        client_order_id: str,
        side: str,
        order_type: str,
        tif: str,
        price: Decimal | None,
        quantity: Decimal,
        quote_qty: Decimal | None,
        fills: list[tuple[Decimal, Decimal]],
    ) -> _Order:
        now = _now_ms()
        order = _Order(
            order_id=self._next_order_id,
            client_order_id=client_order_id,
            symbol_id=market.id,
            side=side,
            type=order_type,
            time_in_force=tif or "GTC",
            price=price if price is not None else Decimal(0),
            orig_qty=quantity,
            orig_quote_qty=quote_qty if quote_qty is not None else Decimal(0),
            time=now,
            update_time=now,
        )
        self._next_order_id += 1
        self._orders[order.order_id] = order
        self._order_stamps.append(time.monotonic())
        base, quote = self._balances[market.base], self._balances[market.quote]
        book = market.asks if side == "BUY" else market.bids
        for fill_price, fill_qty in fills:
            _consume(book, fill_price, fill_qty)
            gross_quote = fill_price * fill_qty
            third = self._third_party_fee(market, gross_quote)
            if third is not None:
                fee_asset, fee = third
                self._balances[fee_asset].free -= fee
                if side == "BUY":
                    quote.free -= gross_quote
                    base.free += fill_qty
                else:
                    base.free -= fill_qty
                    quote.free += gross_quote
            elif side == "BUY":
                fee = _commission(fill_qty, market.taker_fee)
                quote.free -= gross_quote
                base.free += fill_qty - fee
                fee_asset = market.base
            else:
                fee = _commission(gross_quote, market.taker_fee)
                base.free -= fill_qty
                quote.free += gross_quote - fee
                fee_asset = market.quote
            trade = _Trade(
                id=self._next_trade_id,
                order_id=order.order_id,
                symbol_id=market.id,
                price=fill_price,
                qty=fill_qty,
                commission=fee,
                commission_asset=fee_asset,
                time=now,
                is_buyer=side == "BUY",
            )
            self._next_trade_id += 1
            self._trades.append(trade)
            order.fills.append(trade)
            order.executed_qty += fill_qty
            order.cum_quote += gross_quote
            market.last_price = fill_price
        remaining = quantity - order.executed_qty
        if remaining == 0:
            order.status = "FILLED"
        elif order_type == "MARKET" or tif in ("IOC", "FOK"):
            order.status = "EXPIRED"
        else:
            assert price is not None
            order.status = "PARTIALLY_FILLED" if order.executed_qty else "NEW"
            order.locked_asset = market.quote if side == "BUY" else market.base
            order.locked = price * remaining if side == "BUY" else remaining
            held = self._balances[order.locked_asset]
            held.free -= order.locked
            held.locked += order.locked
        self._balance_update_ms = now
        self._count(client_order_id, "accepted")
        if order.status == "FILLED":
            self._count(client_order_id, "filled")
        return order

    def _third_party_fee(self, market: _Market, gross_quote: Decimal) -> tuple[str, Decimal] | None:
        """The fee in the configured fee asset, or None when none is set or the account cannot pay it."""
        if self._fee_asset is None:
            return None
        asset, price = self._fee_asset
        fee = _commission(gross_quote / price, market.taker_fee)
        held = self._balances.get(asset)
        if held is None or held.free < fee:
            return None
        return asset, fee

    def _find_order(self, params: dict[str, str], market: _Market, code: int, msg: str) -> _Order:
        order_id = _param_int(params, "orderId")
        client_id = params.get("origClientOrderId")
        if order_id is None and not client_id:
            raise _bad(-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!")
        if order_id is not None:
            found = self._orders.get(order_id)
            if found and found.symbol_id == market.id and (not client_id or found.client_order_id == client_id):
                return found
            raise _bad(code, msg)
        # the newest order with that client order id, as Binance answers for a reused id
        for order in reversed(self._orders.values()):
            if order.symbol_id == market.id and order.client_order_id == client_id:
                return order
        raise _bad(code, msg)

    def _get_order(self, req: _Request) -> Any:
        market = self._market(req.params)
        order = self._find_order(req.params, market, -2013, "Order does not exist.")
        return _order_query(order, market)

    def _cancel_order(self, req: _Request) -> Any:
        market = self._market(req.params)
        order = self._find_order(req.params, market, -2011, "Unknown order sent.")
        if not order.is_open:
            raise _bad(-2011, "Unknown order sent.")
        held = self._balances[order.locked_asset]
        held.locked -= order.locked
        held.free += order.locked
        order.locked = Decimal(0)
        order.status = "CANCELED"
        order.update_time = _now_ms()
        self._balance_update_ms = order.update_time
        reply = _order_query(order, market)
        for key in ("stopPrice", "icebergQty", "time", "updateTime", "isWorking", "workingTime"):
            reply.pop(key, None)
        reply["origClientOrderId"] = order.client_order_id
        reply["clientOrderId"] = req.params.get("newClientOrderId") or _generated_client_id(order.order_id)
        reply["transactTime"] = order.update_time
        return reply

    def _open_orders(self, req: _Request) -> Any:
        market = self._market(req.params) if "symbol" in req.params else None
        return [
            _order_query(o, self._markets[o.symbol_id])
            for o in self._orders.values()
            if o.is_open and (market is None or o.symbol_id == market.id)
        ]

    def _all_orders(self, req: _Request) -> Any:
        market = self._market(req.params)
        orders = [o for o in self._orders.values() if o.symbol_id == market.id]
        chosen = _page(orders, req.params, lambda o: o.order_id, lambda o: o.time, "orderId")
        return [_order_query(o, market) for o in chosen]

    def _my_trades(self, req: _Request) -> Any:
        market = self._market(req.params)
        trades = [t for t in self._trades if t.symbol_id == market.id]
        order_id = _param_int(req.params, "orderId")
        if order_id is not None:
            trades = [t for t in trades if t.order_id == order_id]
        chosen = _page(trades, req.params, lambda t: t.id, lambda t: t.time, "fromId")
        return [
            {
                "symbol": t.symbol_id,
                "id": t.id,
                "orderId": t.order_id,
                "orderListId": -1,
                "price": _fmt(t.price),
                "qty": _fmt(t.qty),
                "quoteQty": _fmt(t.quote_qty),
                "commission": _fmt(t.commission),
                "commissionAsset": t.commission_asset,
                "time": t.time,
                "isBuyer": t.is_buyer,
                "isMaker": t.is_maker,
                "isBestMatch": True,
            }
            for t in chosen
        ]


# --- pure helpers of the engine ------------------------------------------------------------------


def _tick_for(bids: list[list[Decimal]], asks: list[list[Decimal]], at_most: Decimal) -> Decimal:
    """The coarsest tick that every book price sits on, and never coarser than `at_most`."""
    exponents = [p.normalize().as_tuple().exponent for p, _ in itertools.chain(bids, asks)]
    finest = min((e for e in exponents if isinstance(e, int)), default=0)
    tick = Decimal(1).scaleb(min(finest, 0))
    return min(tick, at_most)


def _levels(levels: Iterable[Sequence[Decimal | str | int]], *, descending: bool) -> list[list[Decimal]]:
    result: list[list[Decimal]] = []
    for level in levels:
        if len(level) != 2:
            raise ValueError("a book level is a pair [price, amount]")
        price, amount = _to_decimal(level[0], "price"), _to_decimal(level[1], "amount")
        if price <= 0 or amount <= 0:
            raise ValueError("price and amount of a book level must be above 0")
        if result and ((price >= result[-1][0]) if descending else (price <= result[-1][0])):
            raise ValueError("book levels must be best first with distinct prices")
        result.append([price, amount])
    return result


def _symbol_info(m: _Market) -> dict[str, Any]:
    return {
        "symbol": m.id,
        "status": "TRADING",
        "baseAsset": m.base,
        "baseAssetPrecision": 8,
        "quoteAsset": m.quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
        "icebergAllowed": False,
        "ocoAllowed": False,
        "otoAllowed": False,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": False,
        "cancelReplaceAllowed": False,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": _fmt(m.tick),
                "maxPrice": _fmt(_MAX_PRICE),
                "tickSize": _fmt(m.tick),
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": _fmt(m.step),
                "maxQty": _fmt(_MAX_QTY),
                "stepSize": _fmt(m.step),
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": _fmt(m.min_notional),
                "applyMinToMarket": True,
                "maxNotional": _fmt(_MAX_NOTIONAL),
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
        ],
        "permissions": ["SPOT"],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def _book_row(m: _Market) -> dict[str, str]:
    bid = m.bids[0] if m.bids else [Decimal(0), Decimal(0)]
    ask = m.asks[0] if m.asks else [Decimal(0), Decimal(0)]
    return {
        "symbol": m.id,
        "bidPrice": _fmt(bid[0]),
        "bidQty": _fmt(bid[1]),
        "askPrice": _fmt(ask[0]),
        "askQty": _fmt(ask[1]),
    }


def _last(m: _Market) -> Decimal:
    if m.last_price is not None:
        return m.last_price
    return m.mid().quantize(m.tick, rounding=ROUND_HALF_EVEN)


def _book_volume(m: _Market) -> Decimal:
    return sum((a for _, a in itertools.chain(m.bids, m.asks)), Decimal(0))


def _check_lot_size(m: _Market, quantity: Decimal) -> None:
    if quantity < m.step or quantity > _MAX_QTY or (quantity - m.step) % m.step != 0:
        raise _bad(-1013, "Filter failure: LOT_SIZE")


def _crosses(side: str, price: Decimal | None, best: Decimal) -> bool:
    if price is None:
        return True
    return price >= best if side == "BUY" else price <= best


def _walk(
    levels: list[list[Decimal]], quantity: Decimal, side: str, limit_price: Decimal | None
) -> list[tuple[Decimal, Decimal]]:
    """The fills taking `quantity` from the book, best level first, never beyond `limit_price`."""
    fills: list[tuple[Decimal, Decimal]] = []
    remaining = quantity
    for price, amount in levels:
        if remaining <= 0 or not _crosses(side, limit_price, price):
            break
        take = min(amount, remaining)
        fills.append((price, take))
        remaining -= take
    return fills


def _qty_for_quote(levels: list[list[Decimal]], quote: Decimal) -> Decimal:
    """The base quantity whose cost (buy) or proceeds (sell) walking the book equals `quote`."""
    spent = Decimal(0)
    quantity = Decimal(0)
    for price, amount in levels:
        cost = price * amount
        if spent + cost <= quote:
            spent += cost
            quantity += amount
        else:
            return quantity + (quote - spent) / price
    return quantity


def _consume(levels: list[list[Decimal]], price: Decimal, quantity: Decimal) -> None:
    for level in levels:
        if level[0] == price:
            level[1] -= quantity
            break
    levels[:] = [level for level in levels if level[1] > 0]


def _generated_client_id(seed: int) -> str:
    return "emu" + hashlib.sha256(f"{seed}:{time.time_ns()}".encode()).hexdigest()[:19]


def _without_signature(raw: str) -> str:
    if not raw:
        return ""
    return "&".join(part for part in raw.split("&") if not part.startswith("signature="))


def _order_query(o: _Order, m: _Market) -> dict[str, Any]:
    return {
        "symbol": m.id,
        "orderId": o.order_id,
        "orderListId": -1,
        "clientOrderId": o.client_order_id,
        "price": _fmt(o.price),
        "origQty": _fmt(o.orig_qty),
        "executedQty": _fmt(o.executed_qty),
        "cummulativeQuoteQty": _fmt(o.cum_quote),
        "status": o.status,
        "timeInForce": o.time_in_force,
        "type": o.type,
        "side": o.side,
        "stopPrice": "0.00000000",
        "icebergQty": "0.00000000",
        "time": o.time,
        "updateTime": o.update_time,
        "isWorking": True,
        "workingTime": o.time,
        "origQuoteOrderQty": _fmt(o.orig_quote_qty),
        "selfTradePreventionMode": "EXPIRE_MAKER",
    }


def _order_reply(o: _Order, m: _Market, resp_type: str) -> dict[str, Any]:
    ack: dict[str, Any] = {
        "symbol": m.id,
        "orderId": o.order_id,
        "orderListId": -1,
        "clientOrderId": o.client_order_id,
        "transactTime": o.time,
    }
    if resp_type == "ACK":
        return ack
    result = {
        **ack,
        "price": _fmt(o.price),
        "origQty": _fmt(o.orig_qty),
        "executedQty": _fmt(o.executed_qty),
        "origQuoteOrderQty": _fmt(o.orig_quote_qty),
        "cummulativeQuoteQty": _fmt(o.cum_quote),
        "status": o.status,
        "timeInForce": o.time_in_force,
        "type": o.type,
        "side": o.side,
        "workingTime": o.time,
        "selfTradePreventionMode": "EXPIRE_MAKER",
    }
    if resp_type == "FULL":
        result["fills"] = [
            {
                "price": _fmt(t.price),
                "qty": _fmt(t.qty),
                "commission": _fmt(t.commission),
                "commissionAsset": t.commission_asset,
                "tradeId": t.id,
            }
            for t in o.fills
        ]
    return result


def _page(
    items: list[Any],
    params: dict[str, str],
    ident: Callable[[Any], int],
    stamp: Callable[[Any], int],
    from_param: str,
) -> list[Any]:
    """Binance's paging: from an id or a start time the oldest `limit`, else the newest `limit`."""
    limit = max(1, min(_param_int(params, "limit") or 500, 1000))
    from_id = _param_int(params, from_param)
    start = _param_int(params, "startTime")
    end = _param_int(params, "endTime")
    if from_id is not None:
        items = [i for i in items if ident(i) >= from_id]
    if start is not None:
        items = [i for i in items if stamp(i) >= start]
    if end is not None:
        items = [i for i in items if stamp(i) <= end]
    if from_id is not None or start is not None:
        return items[:limit]
    return items[-limit:]


def _sign_at(symbol_id: str, interval: str, index: int) -> int:
    block, position = divmod(index, 8)
    digest = hashlib.blake2b(f"{symbol_id}|{interval}|{block}".encode(), digest_size=8).digest()
    pattern = _BALANCED_BLOCKS[int.from_bytes(digest, "big") % len(_BALANCED_BLOCKS)]
    return pattern[position]


def _synthetic_klines(
    m: _Market, interval: str, limit: int, start: int | None, end: int | None, now: int
) -> list[list[Any]]:
    step = _INTERVAL_MS[interval]
    offset = _INTERVAL_OFFSET_MS.get(interval, 0)
    current = (now - offset) // step  # index of the candle still open
    last = current if end is None else min(current, (end - offset) // step)
    if start is not None:
        first = -(-(start - offset) // step)
        last = min(last, first + limit - 1)
    else:
        first = last - limit + 1
    first = max(first, current - _MAX_KLINE_STEPS)
    if last < first:
        return []
    sigma = (m.volatility or Decimal(0)) * (Decimal(step) / _DAY_MS).sqrt()
    up = sigma.exp()
    # level[k] = log-price of close k in units of sigma, relative to the close of the open candle
    level: dict[int, int] = {current: 0}
    for k in range(current, first - 2, -1):
        level[k - 1] = level[k] - _sign_at(m.id, interval, k)
    reference = m.mid()
    volume = _book_volume(m)
    rows: list[list[Any]] = []
    for k in range(first, last + 1):
        open_ = (reference * up ** level[k - 1]).quantize(m.tick, rounding=ROUND_HALF_EVEN)
        close = (reference * up ** level[k]).quantize(m.tick, rounding=ROUND_HALF_EVEN)
        vol = (volume * (1 + Decimal(k % 7) / 10)).quantize(_EIGHT)
        open_ms = k * step + offset
        rows.append(
            [
                open_ms,
                _fmt(open_),
                _fmt(max(open_, close)),
                _fmt(min(open_, close)),
                _fmt(close),
                _fmt(vol),
                open_ms + step - 1,
                _fmt((vol * close).quantize(_EIGHT)),
                100,
                _fmt((vol / 2).quantize(_EIGHT)),
                _fmt((vol * close / 2).quantize(_EIGHT)),
                "0",
            ]
        )
    return rows


_ROUTES: dict[tuple[str, str], _Route] = {
    ("GET", "/api/v3/ping"): _Route(Emulator._ping, _const(1)),
    ("GET", "/api/v3/time"): _Route(Emulator._time, _const(1)),
    ("GET", "/api/v3/exchangeInfo"): _Route(Emulator._exchange_info, _const(20)),
    ("GET", "/api/v3/depth"): _Route(Emulator._depth, _depth_weight),
    ("GET", "/api/v3/klines"): _Route(Emulator._klines, _const(2)),
    ("GET", "/api/v3/ticker/bookTicker"): _Route(Emulator._book_ticker, _one_or_all_weight(2, 4)),
    ("GET", "/api/v3/ticker/price"): _Route(Emulator._ticker_price, _one_or_all_weight(2, 4)),
    ("GET", "/api/v3/ticker/24hr"): _Route(Emulator._ticker_24hr, _ticker_24hr_weight),
    ("GET", "/api/v3/account"): _Route(Emulator._account, _const(20), signed=True),
    ("POST", "/api/v3/order"): _Route(Emulator._new_order, _const(1), signed=True),
    ("POST", "/api/v3/order/test"): _Route(Emulator._test_order, _const(1), signed=True),
    ("GET", "/api/v3/order"): _Route(Emulator._get_order, _const(4), signed=True),
    ("DELETE", "/api/v3/order"): _Route(Emulator._cancel_order, _const(1), signed=True),
    ("GET", "/api/v3/openOrders"): _Route(Emulator._open_orders, _one_or_all_weight(6, 80), signed=True),
    ("GET", "/api/v3/allOrders"): _Route(Emulator._all_orders, _const(20), signed=True),
    ("GET", "/api/v3/myTrades"): _Route(Emulator._my_trades, lambda p: 5 if "orderId" in p else 20, signed=True),
    ("GET", "/sapi/v1/system/status"): _Route(Emulator._system_status, _const(1), budget="sapi"),
    ("GET", "/sapi/v1/asset/tradeFee"): _Route(Emulator._trade_fee, _const(1), signed=True, budget="sapi"),
}


# --- HTTP server ---------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: ccxt's requests session reuses the connection
    disable_nagle_algorithm = True  # without it each answer waits ~40 ms for the client's delayed ACK
    server_version = "binance-emulator"
    sys_version = ""
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        emulator = self.server.emulator
        reply = emulator.handle(method, self.path, self.headers.get("X-MBX-APIKEY"), body)
        if reply.action == "hang":
            emulator._wait(reply.hang_seconds)
        if reply.action != "send":
            self._drop()
            return
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = "Error"
        head = [
            f"HTTP/1.1 {reply.status} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in reply.headers),
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
        ]
        # status line, headers and body in one write: one segment, one wake-up of the client
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the emulator's counters are its log, and stderr noise would bury test output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (its timeout, a dropped connection) is a tested case, not an error."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


# --- entry points --------------------------------------------------------------------------------


def start_emulator(
    snapshot: Path | str | Snapshot,
    *,
    port: int = 0,
    weight_limit: int = 6000,
    api_key: str = DEFAULT_API_KEY,
    secret: str = DEFAULT_SECRET,
    weight_window: float = 60.0,
    client_order_id_scope: ClientOrderIdScope = "open",
    ban_after: int = 3,
    ban_seconds: float = 120.0,
) -> Emulator:
    """Start a loopback exchange serving `snapshot` on 127.0.0.1 (`port=0`: any free port)."""
    snap = snapshot if isinstance(snapshot, Snapshot) else load_snapshot(Path(snapshot))
    return Emulator(
        snap,
        port=port,
        weight_limit=weight_limit,
        weight_window=weight_window,
        api_key=api_key,
        secret=secret,
        client_order_id_scope=client_order_id_scope,
        ban_after=ban_after,
        ban_seconds=ban_seconds,
    ).start()


def binance_client(
    base_url: str,
    api_key: str = DEFAULT_API_KEY,
    secret: str = DEFAULT_SECRET,
    *,
    timeout_ms: int = 10_000,
    **options: Any,
) -> Any:
    """A real `ccxt.binance` pointed at `base_url`, for tests; `options` merge into ccxt's `options`.

    Only scheme and host of every REST URL change, so the emulator sees Binance's real paths.
    """
    import ccxt

    exchange = ccxt.binance(
        {
            "apiKey": api_key,
            "secret": secret,
            "number": str,
            "enableRateLimit": False,
            "timeout": timeout_ms,
            "options": {
                "fetchMarkets": {"types": ["spot"]},
                "fetchCurrencies": False,
                "fetchMargins": False,
                "adjustForTimeDifference": False,
                **options,
            },
        }
    )
    base = base_url.rstrip("/")
    exchange.urls["api"] = {
        name: base + urlsplit(url).path if isinstance(url, str) else url for name, url in exchange.urls["api"].items()
    }
    return exchange


class RemoteFaults(FaultControl):
    """Faults of an emulator running in another process, through its control endpoints."""

    def __init__(self, remote: RemoteEmulator) -> None:
        self._remote = remote

    def add(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        method: str | None = None,
        count: int | None = 1,
        **params: Any,
    ) -> None:
        _validated_fault(kind, endpoint, method, count, params)  # fail here, not as an HTTP 400
        payload = {"kind": kind, "endpoint": endpoint, "method": method, "count": count, **params}
        self._remote._call("POST", "faults", payload)

    def rate_limit(self, limit: int) -> None:
        self._remote._call("POST", "rate_limit", {"limit": limit})

    def clear(self) -> None:
        self._remote._call("DELETE", "faults")


class RemoteEmulator:
    """Control of an emulator started with `python -m rebalancer_cli.testing.emulator` (same methods)."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self.faults = RemoteFaults(self)

    def _call(self, method: str, action: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.base_url + CONTROL_PREFIX + action,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ValueError(f"emulator refused {method} {action}: {exc.read().decode()}") from None

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "stats")
        return result

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "state")
        return result

    def set_balance(self, asset: str, amount: Decimal | str | int) -> None:
        self._call("POST", "balance", {"asset": asset, "amount": str(amount)})

    def set_book(
        self,
        symbol: str,
        bids: Iterable[Sequence[Decimal | str | int]],
        asks: Iterable[Sequence[Decimal | str | int]],
    ) -> None:
        self._call(
            "POST",
            "book",
            {
                "symbol": symbol,
                "bids": [[str(p), str(a)] for p, a in bids],
                "asks": [[str(p), str(a)] for p, a in asks],
            },
        )

    def reset(self) -> None:
        self._call("POST", "reset")


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the first line on stdout is the base URL, written once ready."""
    parser = argparse.ArgumentParser(
        prog="python -m rebalancer_cli.testing.emulator",
        description="Loopback Binance spot exchange emulator serving a snapshot file.",
    )
    parser.add_argument("--snapshot", required=True, type=Path, help="snapshot file (DESIGN.md format)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--secret", default=DEFAULT_SECRET)
    parser.add_argument("--weight-limit", type=int, default=6000, help="request weight per minute")
    parser.add_argument("--weight-window", type=float, default=60.0, help="seconds of the weight window")
    parser.add_argument(
        "--client-order-id-scope",
        choices=("open", "any"),
        default="open",
        help="refuse a repeated client order id while that order is open (Binance) or always",
    )
    args = parser.parse_args(argv)
    from rebalancer_cli.errors import InvalidFileError

    try:
        snapshot = load_snapshot(args.snapshot)
    except InvalidFileError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    emulator = start_emulator(
        snapshot,
        port=args.port,
        weight_limit=args.weight_limit,
        weight_window=args.weight_window,
        api_key=args.api_key,
        secret=args.secret,
        client_order_id_scope=args.client_order_id_scope,
    )
    sys.stdout.write(emulator.base_url + "\n")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
