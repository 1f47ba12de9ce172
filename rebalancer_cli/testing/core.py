"""The exchange-neutral core of the loopback exchange emulators: state, matching, faults, HTTP.

Why emulators exist: every test of execution must run through ccxt's own signing, request building,
response parsing and error mapping, because that is where real-money bugs hide (a float where a string was
expected, a duplicate order after a timeout, an error class mapped as retryable). Mocking ccxt would test
our assumptions about ccxt instead. So each emulator speaks the subset of one exchange's REST API that ccxt
uses, in that exchange's documented shapes, and the only thing a client changes is the base URL.

This module names no exchange. It hosts a **dialect** (one exchange's REST API, e.g. `binance.py`) and
does everything that does not differ between exchanges:

* Accounts and balances (free and locked per asset), loaded from a snapshot file (README: snapshot format).
* Books that deplete as orders fill. MARKET orders (by base quantity or by quote amount) walk the book
  level by level; LIMIT orders fill what crosses their price and the rest rests (GTC, locking the
  balance), expires (IOC) or nothing fills (FOK); LIMIT_MAKER (post-only) refuses to cross. Nothing else
  trades: a resting order never fills later.
* The taker fee per fill, in the asset received (`Dialect.fee_in = "received"`, Binance without BNB) or
  always in the quote asset (`"quote"`), rounded up to `Dialect.fee_decimals`; `set_fee_asset` charges
  it in a third asset instead, as Binance does with BNB.
* Checks in the order real exchanges make them: lot size, price tick, notional, post-only cross,
  duplicate client order id, balance. A duplicate is an id held by an OPEN order (scope "open", what
  Binance, OKX and Bybit document: a filled order frees its id) or by any order ever seen ("any").
* Counts per client order id: `stats()["orders"][client_id] == {accepted, filled, rejected, duplicates}`,
  the ground truth that tests judge idempotency by (never the tool's own records).
* Request budgets in a sliding window (429 with an honest `Retry-After` past the limit; a ban for a
  client that keeps sending during Retry-After), and fault injection (`FaultControl`: latency, timeout
  after accept, 5xx (a gateway's page or the exchange's own internal error), dropped connection, a 429
  with Retry-After, forced insufficient funds, forced filter failure, forced key refusal; duplicate ids
  need no fault: send one twice). A request sent during a Retry-After is counted.
* The HTTP server (keep-alive, one write per answer) and the control API under `/__emulator__/`
  (`stats`, `state`, `faults`, `rate_limit`, `balance`, `book`, `reset`; `RemoteEmulator` drives it).

The dialect API
===============

A dialect is a subclass of `Dialect`, registered by one line in `rebalancer_cli/testing/__init__.py`
(`DIALECTS`). One instance serves one `Emulator`; `self.emulator` is set before `routes()` is called.

Declaring what it is (class attributes):
    `name` (registry name, also `python -m rebalancer_cli.testing.emulator --exchange NAME`), `ccxt_id`
    (the ccxt class that drives it), `credentials` (the ccxt credential fields the emulator accepts by
    default: `apiKey`, `secret`, and `password` where the exchange has a passphrase), `order_path` (the
    path of the route that places orders: faults aimed at "the order endpoint", `ORDER_ENDPOINT`, land
    there), `budgets` (request budgets; the first is the one `weight_limit` sets), `weight_limit` and
    `weight_window` (its defaults), `fee_in`, `fee_decimals`, `max_tick` (the coarsest price tick a
    market gets; the tick is derived from the book's prices), `client_id_pattern` (the exchange's rule,
    checked by the dialect where the exchange checks it), `auth_codes` and `default_auth_code` (the
    refusals `faults.reject_auth(code=...)` can force), `content_type`, `ccxt_options` (options of the
    ccxt client `Dialect.client` builds), `config_options` (the `exchange.options` of test configs: short
    acceptance windows keep the settle waits of recovery short), `config_exchange` (other keys of their
    `exchange:` block, e.g. a `rate_limit_per_minute` matching the account tier the emulator's budgets model).

Declaring routes:
    `routes()` returns `{(METHOD, path): Route(handler, weight, signed=..., budget=..., places_order=...,
    name=...)}`. A path may hold `{name}` segments (`/orders/historical/{order_id}`); their values arrive in
    `request.path_params`. `name` says what the route does in neutral words (create_order, fetch_order,
    cancel_order, balance, book, tickers, markets, trades, fees, candles): `stats()["calls"]` counts by it
    and `stats()["call_log"]` lists them in order, so that the contract suite judges every exchange alike.
    `handler(request)` returns the JSON-ready payload of a 200 answer or raises
    `ApiError(status, payload)` for the exchange's error answer (a `bytes` payload goes out as plain text).
    The core has parsed the parameters (`Dialect.parse_params`: query string plus form or JSON body by
    default) and counted the weight.

Authenticating a request:
    For a `signed` route the core first applies a forced `reject_auth` fault (raising
    `auth_refusal(code)`), then calls `authenticate(request)`, which checks headers, timestamps (the
    exchange's validity window: Binance's `recvWindow`, OKX's 30 s, ...) and the signature against
    `self.emulator.api_key / secret / password`, raising `ApiError` as the exchange does.

Rendering an error:
    The engine refuses on its own merits by raising `Rejection(reason, detail)`, with `reason` one of
    `REJECTIONS` (`insufficient_funds`, `filter` with detail LOT_SIZE / NOTIONAL / PRICE_FILTER,
    `duplicate_client_id`, `order_not_found`, `would_take`, `unknown_market`). The core turns it into the
    answer `render_rejection(rejection)` returns. The dialect also renders `rate_limited`, `banned`,
    `unknown_route`, `unknown_status` (the answer of `timeout_after_accept(mode="unknown_status")`) and
    may add headers to order answers (`extra_headers`). `adopt(market)` may rewrite a market's neutral
    rules at every (re)load (a minimum size in place of a minimum notional). A 5xx fault answers a
    gateway's HTML page, or with `body="exchange"` the dialect's `internal_error(status)`.

Mapping a client id and placing an order:
    A dialect's place-order handler validates the request the exchange's way, reads the client order id
    from wherever that exchange takes it (Binance `newClientOrderId`, OKX `clOrdId`, Bybit
    `orderLinkId`, ...), checks it against the exchange's id rules, and calls
    `self.emulator.submit(client_id, build, test=False)`, where `build()` returns an `OrderRequest`
    (neutral: market, side buy/sell, type market/limit/limit_maker, time in force GTC/IOC/FOK, price,
    base amount or quote amount). `submit` counts the outcome for that client id (a refusal raised by
    `build` itself counts as rejected) and returns the `Order`. Lookups: `emulator.find_order(market,
    order_id=..., client_order_id=...)` (the newest order with that client id), `emulator.cancel(order)`.
    Orders without a client id get `emulator.generated_client_id()`. `emulator.rest_order(...)` places a
    resting GTC order as another client of the account would (the contract suite's duplicate id).

Rendering an order:
    An `Order` is neutral: `status` is one of open / partially_filled / filled / canceled / expired,
    `side` buy / sell, `type` market / limit / limit_maker, amounts are Decimals, `fills` its `Trade`s.
    The dialect writes it in the exchange's shape (status words, number formats, envelopes).

Market data helpers: `emulator.markets` (by the dialect's market id, from `Dialect.market_id`),
`emulator.market_by_symbol`, `emulator.balances`, `emulator.orders`, `emulator.trades`,
`emulator.account_fee()`, `emulator.candles(...)` (deterministic candles whose realized volatility
matches the snapshot's), `emulator.budget_limit(name)`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, ROUND_UP, Decimal, InvalidOperation, localcontext
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit

from rebalancer_cli.snapshot import Snapshot, load_snapshot

DEFAULT_API_KEY = "emulator-api-key-0123456789abcdef0123456789abcdef0123456789abcdef"
DEFAULT_SECRET = "emulator-secret-0123456789abcdef0123456789abcdef0123456789abcdef0"
DEFAULT_PASSWORD = "emulator-passphrase-0123"
CONTROL_PREFIX = "/__emulator__/"
# A fault's endpoint meaning "the dialect's order placement route" (`Dialect.order_path`)
ORDER_ENDPOINT = "@order"

ClientOrderIdScope = Literal["open", "any"]
OrderStatus = Literal["open", "partially_filled", "filled", "canceled", "expired"]
REJECTIONS = (
    "insufficient_funds",
    "filter",
    "duplicate_client_id",
    "order_not_found",
    "would_take",
    "unknown_market",
)
FILTERS = ("LOT_SIZE", "NOTIONAL", "PRICE_FILTER")

MAX_QTY = Decimal("9000000000000")
MAX_PRICE = Decimal("1000000000")
MAX_NOTIONAL = Decimal("9000000000000")
DAY_MS = 86_400_000
_MAX_KLINE_STEPS = 200_000
# Every 8-step sign pattern with four ups and four downs: a window's mean return stays near zero, so its
# sample standard deviation stays near sigma whatever the window.
_BALANCED_BLOCKS: tuple[tuple[int, ...], ...] = tuple(
    tuple(1 if i in ups else -1 for i in range(8)) for ups in itertools.combinations(range(8), 4)
)
_AFTER_ACCEPT_MODES = ("hang", "drop", "unknown_status")


# --- errors and small helpers --------------------------------------------------------------------


class ApiError(Exception):
    """An exchange's error answer: HTTP status, the JSON-ready body, and any extra headers."""

    def __init__(self, status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(str(payload))
        self.status = status
        self.payload = payload
        self.headers = list(headers)


class Rejection(Exception):
    """The engine refuses an order or a lookup on its merits; the dialect renders it (`render_rejection`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECTIONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def plain(value: Decimal) -> str:
    """A Decimal as plain text without trailing zeros (never in exponent form)."""
    return f"{value.normalize():f}"


def to_decimal(value: object, what: str) -> Decimal:
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


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def floor_to(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step


def commission(amount: Decimal, rate: Decimal, decimals: int = 8) -> Decimal:
    """The fee on `amount`, rounded up to `decimals` unless exact."""
    fee = amount * rate
    rounded = fee.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_UP)
    return fee if rounded == fee else rounded


# --- exchange state ------------------------------------------------------------------------------


@dataclass
class Market:
    symbol: str  # unified, e.g. BTC/USDC
    id: str  # the dialect's, e.g. BTCUSDC (Binance), BTC-USDC (OKX)
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

    def last(self) -> Decimal:
        """The last trade's price, or the mid on the tick before any trade."""
        if self.last_price is not None:
            return self.last_price
        return self.mid().quantize(self.tick, rounding=ROUND_HALF_EVEN)

    def book_volume(self) -> Decimal:
        return sum((a for _, a in itertools.chain(self.bids, self.asks)), Decimal(0))


@dataclass
class Trade:
    id: int
    order_id: int
    market_id: str
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
class Order:
    order_id: int
    client_order_id: str
    market_id: str
    side: str  # buy | sell
    type: str  # market | limit | limit_maker
    time_in_force: str  # GTC | IOC | FOK
    price: Decimal  # 0 for a market order
    amount: Decimal  # base units asked for
    quote_amount: Decimal  # quote asked for (a market order by cost), else 0
    time: int
    update_time: int
    filled: Decimal = Decimal(0)
    cost: Decimal = Decimal(0)  # quote value of what filled
    status: OrderStatus = "open"
    fills: list[Trade] = field(default_factory=list)
    locked_asset: str = ""
    locked: Decimal = Decimal(0)

    @property
    def is_open(self) -> bool:
        return self.status in ("open", "partially_filled")

    @property
    def fee_total(self) -> Decimal:
        return sum((t.commission for t in self.fills), Decimal(0))


@dataclass
class Balance:
    free: Decimal
    locked: Decimal = Decimal(0)


@dataclass(frozen=True)
class OrderRequest:
    """A new order in neutral terms, built by a dialect from the exchange's parameters."""

    market: Market
    side: Literal["buy", "sell"]
    type: Literal["market", "limit", "limit_maker"]
    amount: Decimal | None = None  # base units
    quote_amount: Decimal | None = None  # market orders by cost only
    price: Decimal | None = None  # limit orders
    time_in_force: Literal["GTC", "IOC", "FOK", ""] = ""


@dataclass(frozen=True)
class Candle:
    open_ms: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


class WeightWindow:
    """Request weight spent in the last `window` seconds (a sliding window: a test never passes by luck
    of timing, and a client that stays under a sliding limit stays under a fixed-window one too)."""

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
    "too_many_requests",
    "timeout_after_accept",
    "http_5xx",
    "drop_connection",
    "insufficient_balance",
    "filter_failure",
    "reject_auth",
    "bad_fill",
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


def validated_fault(
    kind: str,
    endpoint: str | None,
    method: str | None,
    count: int | None,
    params: dict[str, Any],
    dialect: Dialect | None = None,
) -> Fault:
    """A checked fault; with a `dialect`, its order endpoint and auth codes are resolved and checked too
    (a remote client checks without one, and the server checks the rest)."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError("count must be a positive integer, or None for every matching request")
    if endpoint is not None and endpoint != ORDER_ENDPOINT and not endpoint.startswith("/"):
        raise ValueError(f"endpoint is a path such as /api/v3/order, or {ORDER_ENDPOINT} for the order route")
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
    elif kind == "too_many_requests":
        clean["retry_after"] = int(params.get("retry_after", 1))
        if clean["retry_after"] < 1:
            raise ValueError("retry_after is a whole number of seconds, at least 1")
    elif kind == "http_5xx":
        clean["status"] = int(params.get("status", 503))
        clean["body"] = str(params.get("body", "gateway"))
        if not 500 <= clean["status"] <= 599:
            raise ValueError("status must be a 5xx HTTP status")
        if clean["body"] not in ("gateway", "exchange"):
            raise ValueError("body must be 'gateway' (an HTML page) or 'exchange' (its internal-error JSON)")
    elif kind == "filter_failure":
        clean["filter"] = str(params.get("filter", "LOT_SIZE"))
        if clean["filter"] not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(FILTERS)}")
    elif kind == "bad_fill":
        try:
            clean["price"] = str(Decimal(str(params.get("price", "0"))))
        except ArithmeticError:
            raise ValueError("bad_fill price must be a decimal number") from None
    elif kind == "reject_auth":
        code = params.get("code")
        if dialect is not None:
            code = dialect.default_auth_code if code is None else code
            if code not in dialect.auth_codes:
                raise ValueError(f"code must be one of {sorted(map(str, dialect.auth_codes))}")
        clean["code"] = code
    unknown = set(params) - set(clean)
    if unknown:
        raise ValueError(f"unknown parameters for fault {kind}: {', '.join(sorted(unknown))}")
    if kind in ("insufficient_balance", "filter_failure", "bad_fill"):
        endpoint, method = endpoint or ORDER_ENDPOINT, method or "POST"
    if endpoint == ORDER_ENDPOINT and dialect is not None:
        endpoint = dialect.order_path
    return Fault(kind=kind, endpoint=endpoint, method=method, remaining=count, params=clean)


class FaultControl:
    """The faults a test can arm; the same methods work in process (`Faults`) and over HTTP (`RemoteFaults`).

    `endpoint` is a request path (`/api/v3/order`) or `ORDER_ENDPOINT` (the dialect's order route), `method`
    an HTTP method; both default to any. `count` is how many matching requests the fault hits, None for
    all of them until `clear()`.
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
        """Set the limit of the dialect's first request budget (Binance: 6000 weight per minute)."""
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
        endpoint: str | None = ORDER_ENDPOINT,
        method: str | None = "POST",
    ) -> None:
        """Execute the request (place and fill the order), then never answer it.

        `hang`: hold the connection `hang_seconds` (longer than the client's timeout) and close it;
        `drop`: close it at once; `unknown_status`: answer the exchange's "execution status unknown".
        """
        self.add(
            "timeout_after_accept",
            endpoint=endpoint,
            method=method,
            count=count,
            mode=mode,
            hang_seconds=hang_seconds,
        )

    def too_many_requests(
        self,
        count: int | None = 1,
        *,
        retry_after: int = 1,
        endpoint: str | None = None,
        method: str | None = None,
    ) -> None:
        """Refuse with 429 and `Retry-After: retry_after` (the dialect's rate-limit answer) without running the
        request, whatever the budget; a client that sends again before Retry-After passed is counted in
        `stats()["requests_during_retry_after"]` (and banned after `ban_after` of them, as on Binance)."""
        self.add("too_many_requests", endpoint=endpoint, method=method, count=count, retry_after=retry_after)

    def http_5xx(
        self,
        count: int | None = 1,
        *,
        status: int = 503,
        endpoint: str | None = None,
        method: str | None = None,
        body: str = "gateway",
    ) -> None:
        """Answer `status` without running the request: as a failing gateway does (`body="gateway"`, an HTML
        page), or with the exchange's own internal-error answer (`"exchange"`, e.g. Binance's -1001)."""
        self.add("http_5xx", endpoint=endpoint, method=method, count=count, status=status, body=body)

    def drop_connection(self, count: int | None = 1, *, endpoint: str | None = None, method: str | None = None) -> None:
        """Close the connection without running the request or answering it."""
        self.add("drop_connection", endpoint=endpoint, method=method, count=count)

    def insufficient_balance(self, count: int | None = 1) -> None:
        """Refuse the next new order(s) as short of funds, whatever the balances."""
        self.add("insufficient_balance", count=count)

    def bad_fill(self, price: Decimal | str | int, count: int | None = 1) -> None:
        """Misbehave: fill the next new order(s) in full at `price`, whatever its limit and the book (0 for a
        zero-price fill). For proving that the tool bounds what it accepts, judged by what was filled here."""
        self.add("bad_fill", count=count, price=str(price))

    def filter_failure(self, filter: str = "LOT_SIZE", count: int | None = 1) -> None:
        """Refuse the next new order(s) for breaking a market rule: LOT_SIZE, NOTIONAL or PRICE_FILTER."""
        self.add("filter_failure", count=count, filter=filter)

    def reject_auth(
        self, count: int | None = None, *, code: int | str | None = None, endpoint: str | None = None
    ) -> None:
        """Refuse signed requests as the exchange refuses a bad key; `code` one of the dialect's `auth_codes`
        (Binance: -2015 revoked, the default; -2014 malformed; -1022 badly signed)."""
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
        fault = validated_fault(kind, endpoint, method, count, params, self._emulator.dialect)
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

    def take(self, kind: str, method: str, path: str) -> Fault | None:
        """The first armed fault of `kind` matching the request, counted down (caller holds the lock)."""
        for fault in self._faults:
            if fault.kind == kind and fault.matches(method, path):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None


# --- requests, routes and the dialect ------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, Any]  # query and body parameters, as `Dialect.parse_params` read them
    query: str = ""  # raw query string, for signatures
    body: str = ""  # raw body, for signatures
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased
    path_params: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"{}"
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json;charset=UTF-8"
    action: Literal["send", "drop", "hang"] = "send"
    hang_seconds: float = 0.0


@dataclass(frozen=True)
class Route:
    handler: Callable[[Request], Any]
    weight: Callable[[dict[str, Any]], int]
    signed: bool = False
    budget: str = ""  # a `Budget.name`; "" is the dialect's first budget
    places_order: bool = False  # the dialect adds its order headers (`extra_headers`) to these answers
    # what the route does, for `stats()["calls"]` whatever the exchange calls it: create_order, fetch_order,
    # cancel_order, balance, book, tickers, markets, trades, fees, candles
    name: str = ""


@dataclass(frozen=True)
class Budget:
    """A request budget in a sliding window: `limit` None is the emulator's `weight_limit`; an unenforced
    budget is counted (and reported in `header`) but never refused."""

    name: str
    header: str = ""
    limit: int | None = None
    enforced: bool = True
    header_shows: Literal["used", "remaining"] = "used"  # what `header` reports (Bybit: what remains)

    def report(self, window: WeightWindow, now: float) -> list[tuple[str, str]]:
        """The budget's header on an answer: the weight used in the window, or what remains of its limit."""
        if not self.header:
            return []
        used = window.used(now)
        return [(self.header, str(used if self.header_shows == "used" else max(0, window.limit - used)))]


def const(weight: int) -> Callable[[dict[str, Any]], int]:
    """A route weight that does not depend on the parameters."""
    return lambda _params: weight


class Dialect:
    """One exchange's REST API, hosted by an `Emulator`; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    ccxt_id: ClassVar[str] = ""
    credentials: ClassVar[dict[str, str]] = {"apiKey": DEFAULT_API_KEY, "secret": DEFAULT_SECRET}
    order_path: ClassVar[str] = ""
    budgets: ClassVar[tuple[Budget, ...]] = (Budget("api"),)
    weight_limit: ClassVar[int] = 6000
    weight_window: ClassVar[float] = 60.0
    fee_in: ClassVar[Literal["received", "quote"]] = "received"
    fee_decimals: ClassVar[int] = 8
    max_tick: ClassVar[Decimal] = Decimal("0.01")
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^.{1,64}$")
    auth_codes: ClassVar[tuple[int | str, ...]] = ()
    default_auth_code: ClassVar[int | str | None] = None
    content_type: ClassVar[str] = "application/json;charset=UTF-8"
    # whether a refusal past a budget carries `Retry-After` (an exchange that tells the wait in its own
    # headers, e.g. Bybit's `X-Bapi-Limit-Reset-Timestamp`, sets False and adds them in `rate_limited`)
    retry_after_header: ClassVar[bool] = True
    ccxt_options: ClassVar[dict[str, Any]] = {}
    # the `exchange.options` a test config uses against this emulator (e.g. a short acceptance window)
    config_options: ClassVar[dict[str, Any]] = {}
    config_exchange: ClassVar[dict[str, Any]] = {}

    emulator: Emulator

    def bind(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def routes(self) -> Mapping[tuple[str, str], Route]:
        raise NotImplementedError

    def market_id(self, base: str, quote: str) -> str:
        """The exchange's id of a market (BTCUSDC, BTC-USDC, ...)."""
        raise NotImplementedError

    def parse_params(self, method: str, query: str, body: str, headers: Mapping[str, str]) -> dict[str, Any]:
        """Query string plus body: a JSON object body as it is, else form fields."""
        params: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
        text = body.strip()
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(text)
                if isinstance(doc, dict):
                    params.update(doc)
                    return params
        params.update(parse_qsl(body, keep_blank_values=True))
        return params

    def authenticate(self, request: Request) -> None:
        raise NotImplementedError

    def auth_refusal(self, code: int | str) -> ApiError:
        raise NotImplementedError

    def render_rejection(self, rejection: Rejection) -> ApiError:
        raise NotImplementedError

    def rate_limited(self, limit: int, used: int, retry_after: int) -> ApiError:
        return ApiError(429, {"error": "rate limit exceeded"})

    def banned(self, limit: int, used: int, retry_after: int, until_ms: int) -> ApiError:
        return self.rate_limited(limit, used, retry_after)

    def unknown_route(self, method: str, path: str) -> ApiError:
        return ApiError(404, {"error": f"unknown path {method} {path}"})

    def unknown_status(self) -> ApiError:
        """The answer of an accepted order whose outcome the exchange does not know yet."""
        return ApiError(504, {"error": "gateway timeout"})

    def internal_error(self, status: int) -> ApiError:
        """The exchange's own answer for an internal failure (`faults.http_5xx(body="exchange")`); nothing ran."""
        return ApiError(status, {"error": "internal error"})

    def adopt(self, market: Market) -> None:
        """Turn a snapshot market's neutral rules into the exchange's own, at every (re)load; e.g. an exchange
        with a minimum size instead of a minimum notional (OKX's `minSz`) keeps the size and zeroes the
        notional, so that the core never refuses what that exchange accepts."""

    def extra_headers(self, route: Route, now: float) -> list[tuple[str, str]]:
        return []

    def client(
        self, base_url: str, credentials: Mapping[str, str] | None = None, *, timeout_ms: int = 10_000, **options: Any
    ) -> Any:
        """A real ccxt client of `ccxt_id` pointed at `base_url` (only scheme and host of each URL change)."""
        import ccxt

        from rebalancer_cli.exchange.ccxt_exchange import rebase_urls

        exchange = getattr(ccxt, self.ccxt_id)(
            {
                **(credentials if credentials is not None else self.credentials),
                "number": str,
                "enableRateLimit": False,
                "timeout": timeout_ms,
                "options": {**self.ccxt_options, **options},
            }
        )
        exchange.urls["api"] = rebase_urls(exchange.urls["api"], base_url.rstrip("/"))
        return exchange


def _route_pattern(path: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", path)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


# --- the emulator --------------------------------------------------------------------------------


class Emulator:
    """A running loopback exchange of one dialect; start it with `start_emulator`. Thread-safe."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        dialect: Dialect,
        host: str = "127.0.0.1",
        port: int = 0,
        weight_limit: int | None = None,
        weight_window: float | None = None,
        api_key: str | None = None,
        secret: str | None = None,
        password: str | None = None,
        client_order_id_scope: ClientOrderIdScope = "open",
        ban_after: int = 3,
        ban_seconds: float = 120.0,
    ) -> None:
        if client_order_id_scope not in ("open", "any"):
            raise ValueError("client_order_id_scope must be 'open' (a filled order frees its id) or 'any'")
        self.dialect = dialect
        self._snapshot = snapshot
        self.api_key = api_key if api_key is not None else dialect.credentials.get("apiKey", DEFAULT_API_KEY)
        self.secret = secret if secret is not None else dialect.credentials.get("secret", DEFAULT_SECRET)
        self.password = password if password is not None else dialect.credentials.get("password", "")
        self._client_order_id_scope = client_order_id_scope
        self._initial_weight_limit = weight_limit if weight_limit is not None else dialect.weight_limit
        window = weight_window if weight_window is not None else dialect.weight_window
        self._ban_after = ban_after
        self._ban_seconds = ban_seconds
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self.faults = Faults(self)
        self._windows = {
            b.name: WeightWindow(b.limit if b.limit is not None else self._initial_weight_limit, window)
            for b in dialect.budgets
        }
        self._primary = dialect.budgets[0]
        self._next_order_id = 1
        self._next_trade_id = 1
        dialect.bind(self)
        self._routes: dict[tuple[str, str], Route] = {}
        self._patterns: list[tuple[str, re.Pattern[str], Route]] = []
        for (method, path), route in dialect.routes().items():
            if "{" in path:
                self._patterns.append((method, _route_pattern(path), route))
            else:
                self._routes[(method, path)] = route
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

    @property
    def credentials(self) -> dict[str, str]:
        """The ccxt credential fields this emulator accepts."""
        creds = {"apiKey": self.api_key, "secret": self.secret}
        if self.password:
            creds["password"] = self.password
        return creds

    def client(self, *, timeout_ms: int = 10_000, **options: Any) -> Any:
        """A real ccxt client of the dialect's exchange, pointed at this emulator with its credentials."""
        return self.dialect.client(self.base_url, self.credentials, timeout_ms=timeout_ms, **options)

    def start(self) -> Emulator:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{self.dialect.name}-emulator-{self.port}",
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
        markets: dict[str, Market] = {}
        by_symbol: dict[str, Market] = {}
        for symbol, m in self._snapshot.markets.items():
            bids = [[p, a] for p, a in m.bids]
            asks = [[p, a] for p, a in m.asks]
            market = Market(
                symbol=symbol,
                id=self.dialect.market_id(m.base, m.quote),
                base=m.base,
                quote=m.quote,
                taker_fee=m.taker_fee,
                step=m.amount_step,
                min_notional=m.min_notional,
                bids=bids,
                asks=asks,
                volatility=m.volatility,
                tick=tick_for(bids, asks, self.dialect.max_tick),
                reference=m.mid,
            )
            self.dialect.adopt(market)
            if market.id in markets:
                raise ValueError(f"markets {markets[market.id].symbol} and {symbol} share the id {market.id}")
            markets[market.id] = market
            by_symbol[symbol] = market
        balances: dict[str, Balance] = {}
        for asset, amount in self._snapshot.balances.items():
            balances[asset] = Balance(free=amount, locked=Decimal(0))
        for asset, amount in self._snapshot.locked.items():
            balances.setdefault(asset, Balance(free=Decimal(0))).locked = amount
        for market in markets.values():
            balances.setdefault(market.base, Balance(free=Decimal(0)))
            balances.setdefault(market.quote, Balance(free=Decimal(0)))
        self.markets = markets
        self.market_by_symbol = by_symbol
        self.balances = balances
        self.orders: dict[int, Order] = {}
        self.trades: list[Trade] = []
        self.balance_update_ms = now_ms()
        self._requests: Counter[str] = Counter()
        self._calls: Counter[str] = Counter()
        self._call_log: deque[str] = deque(maxlen=10_000)  # named routes in the order they were called
        self._order_counts: dict[str, Counter[str]] = {}
        self.order_stamps: deque[float] = deque()
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
            self._windows[self._primary.name].limit = self._initial_weight_limit
            for window in self._windows.values():
                window.clear()

    def set_weight_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the weight limit must be at least 1")
        with self._lock:
            self._windows[self._primary.name].limit = int(limit)

    def budget_limit(self, name: str = "") -> int:
        return self._windows[name or self._primary.name].limit

    def set_balance(self, asset: str, amount: Decimal | str | int) -> None:
        """Set the free balance of `asset` (locked amounts stay)."""
        value = to_decimal(amount, "amount")
        if value < 0:
            raise ValueError("a balance cannot be negative")
        with self._lock:
            self.balances.setdefault(asset, Balance(free=Decimal(0))).free = value
            self.balance_update_ms = now_ms()

    def set_book(
        self,
        symbol: str,
        bids: Iterable[Sequence[Decimal | str | int]],
        asks: Iterable[Sequence[Decimal | str | int]],
    ) -> None:
        """Replace a market's book; `symbol` unified (BTC/USDC) or the dialect's id, levels best first."""
        new_bids = _levels(bids, descending=True)
        new_asks = _levels(asks, descending=False)
        if new_bids and new_asks and new_bids[0][0] >= new_asks[0][0]:
            raise ValueError("crossed book: the best bid must be below the best ask")
        with self._lock:
            market = self.market_by_symbol.get(symbol) or self.markets.get(symbol)
            if market is None:
                raise ValueError(f"unknown market {symbol}")
            market.bids, market.asks = new_bids, new_asks
            market.tick = tick_for(new_bids, new_asks, market.tick)
            if new_bids and new_asks:
                market.reference = (new_bids[0][0] + new_asks[0][0]) / 2

    def set_fee_asset(self, asset: str | None, price: Decimal | str | int = 1) -> None:
        """Charge taker fees in `asset` (as Binance does with BNB), converted at `price` quote per unit of it.

        The fee is the commission on the fill's quote value divided by `price`, rounded up; when the account
        holds too little of `asset` the fee falls back to the dialect's rule. `None` restores the default.
        """
        value = to_decimal(price, "price")
        if value <= 0:
            raise ValueError("the fee asset's price must be positive")
        with self._lock:
            self._fee_asset = (asset, value) if asset else None

    def free(self, asset: str) -> Decimal:
        with self._lock:
            balance = self.balances.get(asset)
            return balance.free if balance else Decimal(0)

    def locked(self, asset: str) -> Decimal:
        with self._lock:
            balance = self.balances.get(asset)
            return balance.locked if balance else Decimal(0)

    def stats(self) -> dict[str, Any]:
        """Counters for tests, JSON-ready (also GET /__emulator__/stats)."""
        with self._lock:
            now = time.monotonic()
            primary = self._windows[self._primary.name]
            return {
                "exchange": self.dialect.name,
                "requests": dict(self._requests),
                "calls": dict(self._calls),
                "call_log": list(self._call_log),
                "requests_during_retry_after": self._counters["early"],
                "requests_total": sum(self._requests.values()),
                "weight_total": self._weight_total,
                "weight_used_1m": primary.used(now),
                "weight_limit": primary.limit,
                "rate_limited_429": self._counters["429"],
                "banned_418": self._counters["418"],
                "http_5xx": self._counters["5xx"],
                "dropped": self._counters["dropped"],
                "timeouts_after_accept": self._counters["after_accept"],
                "orders": {cid: dict(c) for cid, c in self._order_counts.items()},
                "orders_accepted": len(self.orders),
                "trades": len(self.trades),
                "faults": [f.as_dict() for f in self.faults._faults],
            }

    def state(self) -> dict[str, Any]:
        """Balances, books and open orders as decimal strings (also GET /__emulator__/state)."""
        with self._lock:
            return {
                "balances": {
                    asset: {"free": plain(b.free), "locked": plain(b.locked)} for asset, b in self.balances.items()
                },
                "books": {
                    m.symbol: {
                        "bids": [[plain(p), plain(a)] for p, a in m.bids],
                        "asks": [[plain(p), plain(a)] for p, a in m.asks],
                    }
                    for m in self.markets.values()
                },
                "open_orders": [o.client_order_id for o in self.orders.values() if o.is_open],
            }

    # --- request pipeline ----------------------------------------------------------------------

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _route(self, method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        route = self._routes.get((method, path))
        if route is not None:
            return route, {}
        for m, pattern, candidate in self._patterns:
            found = pattern.match(path) if m == method else None
            if found:
                return candidate, found.groupdict()
        return None, {}

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        split = urlsplit(target)
        path, raw_query = split.path, split.query
        raw_body = body.decode("utf-8", "replace")
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path[len(CONTROL_PREFIX) :], raw_body)
        route, path_params = self._route(method, path)
        with self._lock:
            self._requests[f"{method} {path}"] += 1
            if route is not None and route.name:  # every request that arrived, answered or not
                self._calls[route.name] += 1
                self._call_log.append(route.name)
            if self.faults.take("drop_connection", method, path):
                self._counters["dropped"] += 1
                return Reply(action="drop")
            latency = self.faults.take("latency", method, path)
        if latency is not None:
            self.wait(float(latency.params["ms"]) / 1000)
        lowered = {k.lower(): v for k, v in headers.items()}
        with self._lock, localcontext() as ctx:
            ctx.prec = 60
            return self._handle_locked(method, path, raw_query, raw_body, lowered, route, path_params)

    def _encode(self, status: int, payload: Any, headers: list[tuple[str, str]]) -> Reply:
        if isinstance(payload, bytes):  # an answer some exchanges give as plain text (Coinbase's 401)
            return Reply(status=status, body=payload, headers=headers, content_type="text/plain; charset=utf-8")
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Reply(status=status, body=body, headers=headers, content_type=self.dialect.content_type)

    def _handle_locked(
        self,
        method: str,
        path: str,
        raw_query: str,
        raw_body: str,
        headers: dict[str, str],
        route: Route | None,
        path_params: dict[str, str],
    ) -> Reply:
        failure = self.faults.take("http_5xx", method, path)
        if failure is not None:
            self._counters["5xx"] += 1
            status = int(failure.params["status"])
            if failure.params.get("body") == "exchange":
                internal = self.dialect.internal_error(status)
                return self._encode(internal.status, internal.payload, internal.headers)
            page = f"<html><body><h1>{status} Service Unavailable</h1></body></html>"
            return Reply(status=status, body=page.encode(), content_type="text/html")
        params = self.dialect.parse_params(method, raw_query, raw_body, headers)
        weight = route.weight(params) if route else 1
        budget = next((b for b in self.dialect.budgets if route and b.name == route.budget), self._primary)
        window = self._windows[budget.name]
        now = time.monotonic()
        refused = self._rate_check(window, budget, weight, now) if budget.enforced else None
        forced = self.faults.take("too_many_requests", method, path) if refused is None else None
        if forced is not None:
            retry_after = int(forced.params["retry_after"])
            self._backoff_until = max(self._backoff_until, now + retry_after)
            self._counters["429"] += 1
            error = self.dialect.rate_limited(window.limit, window.used(now), retry_after)
            return self._limit_reply(error, window, budget, now, retry_after)
        if refused is not None:
            return refused
        window.add(now, weight)
        self._weight_total += weight
        reply_headers = budget.report(window, now)
        after = None
        request = Request(method, path, params, raw_query, raw_body, headers, path_params)
        try:
            if route is None:
                raise self.dialect.unknown_route(method, path)
            if route.signed:
                forced = self.faults.take("reject_auth", method, path)
                if forced is not None:
                    raise self.dialect.auth_refusal(forced.params["code"])
                self.dialect.authenticate(request)
            try:
                payload = route.handler(request)
            except Rejection as rejection:
                raise self.dialect.render_rejection(rejection) from None
            status = 200
        except ApiError as exc:
            status, payload = exc.status, exc.payload
            reply_headers += exc.headers
        if route is not None:
            after = self.faults.take("timeout_after_accept", method, path)
            if route.places_order:
                reply_headers += self.dialect.extra_headers(route, now)
        if after is not None:
            self._counters["after_accept"] += 1
            mode = after.params["mode"]
            if mode == "drop":
                return Reply(action="drop")
            if mode == "hang":
                return Reply(action="hang", hang_seconds=float(after.params["hang_seconds"]))
            unknown = self.dialect.unknown_status()
            status, payload = unknown.status, unknown.payload
        return self._encode(status, payload, reply_headers)

    def _rate_check(self, window: WeightWindow, budget: Budget, weight: int, now: float) -> Reply | None:
        """Refused past the limit (429), banned for whoever keeps sending during Retry-After."""
        if now < self._banned_until:
            return self._ban_reply(window, budget, now)
        if now < self._backoff_until:
            self._counters["early"] += 1
            self._strikes += 1
            if self._strikes >= self._ban_after:
                self._banned_until = now + self._ban_seconds
                return self._ban_reply(window, budget, now)
        if window.fits(now, weight):
            if now >= self._backoff_until:
                self._strikes = 0
            return None
        wait = window.wait_for(now, weight)
        retry_after = max(1, int(-(-wait // 1)))
        self._backoff_until = max(self._backoff_until, now + wait)
        self._counters["429"] += 1
        error = self.dialect.rate_limited(window.limit, window.used(now), retry_after)
        return self._limit_reply(error, window, budget, now, retry_after)

    def _ban_reply(self, window: WeightWindow, budget: Budget, now: float) -> Reply:
        self._counters["418"] += 1
        remaining = self._banned_until - now
        retry_after = max(1, int(-(-remaining // 1)))
        error = self.dialect.banned(window.limit, window.used(now), retry_after, now_ms() + int(remaining * 1000))
        return self._limit_reply(error, window, budget, now, retry_after)

    def _limit_reply(self, error: ApiError, window: WeightWindow, budget: Budget, now: float, retry: int) -> Reply:
        headers = budget.report(window, now)
        retry_after = [("Retry-After", str(retry))] if self.dialect.retry_after_header else []
        return self._encode(error.status, error.payload, [*headers, *retry_after, *error.headers])

    # --- control API ---------------------------------------------------------------------------

    def _control(self, method: str, action: str, raw_body: str) -> Reply:
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
                return Reply(status=404, body=json.dumps({"error": f"no control {method} {action}"}).encode())
        except (KeyError, TypeError, ValueError) as exc:
            return Reply(status=400, body=json.dumps({"error": str(exc)}).encode())
        return Reply(body=json.dumps(result, separators=(",", ":")).encode())

    # --- services for dialects -------------------------------------------------------------------

    def account_fee(self) -> Decimal:
        """One account-wide taker fee: the most common market fee stands for it."""
        fees = Counter(m.taker_fee for m in self.markets.values())
        if not fees:
            return Decimal("0.001")
        best = max(fees.values())
        return max(fee for fee, n in fees.items() if n == best)

    @property
    def update_id(self) -> int:
        """A number that grows with every order and trade (a book's update id)."""
        return self._next_trade_id + self._next_order_id

    def generated_client_id(self) -> str:
        """An exchange-assigned client order id for an order sent without one."""
        return "emu" + hashlib.sha256(f"{self._next_order_id}:{time.time_ns()}".encode()).hexdigest()[:19]

    def find_order(
        self, market: Market | None, *, order_id: int | None = None, client_order_id: str | None = None
    ) -> Order | None:
        """The order by exchange id (checked against the client id when both are given), else the newest
        order with that client id, as exchanges answer for a reused id; `market` None: any market."""
        if order_id is not None:
            found = self.orders.get(order_id)
            if (
                found
                and (market is None or found.market_id == market.id)
                and (not client_order_id or found.client_order_id == client_order_id)
            ):
                return found
            return None
        for order in reversed(self.orders.values()):
            if (market is None or order.market_id == market.id) and order.client_order_id == client_order_id:
                return order
        return None

    def cancel(self, order: Order) -> None:
        """Cancel an open order, releasing what it locked; a closed one is `order_not_found`."""
        if not order.is_open:
            raise Rejection("order_not_found", "the order is not open")
        held = self.balances[order.locked_asset]
        held.locked -= order.locked
        held.free += order.locked
        order.locked = Decimal(0)
        order.status = "canceled"
        order.update_time = now_ms()
        self.balance_update_ms = order.update_time

    def rest_order(
        self,
        symbol: str,
        side: Literal["buy", "sell"],
        amount: Decimal | str,
        price: Decimal | str,
        client_order_id: str,
    ) -> Order:
        """Place a resting GTC limit order as another client of the account would (counted like any order)."""
        with self._lock, localcontext() as ctx:
            ctx.prec = 60
            market = self.market_by_symbol[symbol]
            request = OrderRequest(
                market,
                side,
                "limit",
                amount=to_decimal(amount, "amount"),
                price=to_decimal(price, "price"),
                time_in_force="GTC",
            )
            order = self.submit(client_order_id, lambda: request)
            assert order is not None
            return order

    def count(self, client_order_id: str, what: str) -> None:
        counts = self._order_counts.setdefault(
            client_order_id, Counter({"accepted": 0, "filled": 0, "rejected": 0, "duplicates": 0})
        )
        counts[what] += 1

    def submit(self, client_order_id: str, build: Callable[[], OrderRequest], *, test: bool = False) -> Order | None:
        """Build the order (the dialect's own validation) and place it, counting the outcome for this client
        id; a test order (`test`) runs every check, places nothing, counts nothing and returns None."""
        try:
            return self.place(client_order_id, build(), test=test)
        except Rejection as exc:
            if not test:
                self.count(client_order_id, "duplicates" if exc.reason == "duplicate_client_id" else "rejected")
            raise
        except ApiError:
            if not test:
                self.count(client_order_id, "rejected")
            raise

    def place(self, client_order_id: str, req: OrderRequest, *, test: bool = False) -> Order | None:
        """The market's checks in the exchange's order, then the fills (see the module docstring)."""
        market, side, price, quote_qty = req.market, req.side, req.price, req.quote_amount
        forced = self.faults.take("filter_failure", "POST", self.dialect.order_path)
        if forced is not None:
            raise Rejection("filter", str(forced.params["filter"]))
        if price is not None and (price < market.tick or price > MAX_PRICE or price % market.tick):
            raise Rejection("filter", "PRICE_FILTER")
        levels = market.asks if side == "buy" else market.bids
        quantity = req.amount
        if quote_qty is not None:
            quantity = floor_to(_qty_for_quote(levels, quote_qty), market.step)
        assert quantity is not None, "an order request needs an amount or a quote amount"
        if quantity < market.step or quantity > MAX_QTY or (quantity - market.step) % market.step != 0:
            raise Rejection("filter", "LOT_SIZE")
        notional = quote_qty if quote_qty is not None else quantity * (price if price is not None else market.mid())
        if notional < market.min_notional or notional > MAX_NOTIONAL:
            raise Rejection("filter", "NOTIONAL")
        if req.type == "limit_maker" and levels and _crosses(side, price, levels[0][0]):
            raise Rejection("would_take")
        fills = [] if req.type == "limit_maker" else _walk(levels, quantity, side, price)
        if req.type == "limit" and req.time_in_force == "FOK" and sum(q for _, q in fills) < quantity:
            fills = []
        if not test and (bad := self.faults.take("bad_fill", "POST", self.dialect.order_path)) is not None:
            fills = [(Decimal(bad.params["price"]), quantity)]  # the limit and the book ignored
        if not test and any(
            o.client_order_id == client_order_id and (o.is_open or self._client_order_id_scope == "any")
            for o in self.orders.values()
        ):
            raise Rejection("duplicate_client_id", client_order_id)
        base, quote = self.balances[market.base], self.balances[market.quote]
        if side == "buy":
            if req.type == "market":
                need = quote_qty if quote_qty is not None else sum((p * q for p, q in fills), Decimal(0))
            else:
                assert price is not None
                need = price * quantity
            if self.dialect.fee_in == "quote":
                need += commission(need, market.taker_fee, self.dialect.fee_decimals)
            short = quote.free < need
        else:
            short = base.free < quantity
        if self.faults.take("insufficient_balance", "POST", self.dialect.order_path) is not None or short:
            raise Rejection("insufficient_funds")
        if test:
            return None
        return self._execute(market, client_order_id, req, quantity, fills)

    def _execute(
        self,
        market: Market,
        client_order_id: str,
        req: OrderRequest,
        quantity: Decimal,
        fills: list[tuple[Decimal, Decimal]],
    ) -> Order:
        now = now_ms()
        side, price = req.side, req.price
        order = Order(
            order_id=self._next_order_id,
            client_order_id=client_order_id,
            market_id=market.id,
            side=side,
            type=req.type,
            time_in_force=req.time_in_force or "GTC",
            price=price if price is not None else Decimal(0),
            amount=quantity,
            quote_amount=req.quote_amount if req.quote_amount is not None else Decimal(0),
            time=now,
            update_time=now,
        )
        self._next_order_id += 1
        self.orders[order.order_id] = order
        self.order_stamps.append(time.monotonic())
        base, quote = self.balances[market.base], self.balances[market.quote]
        book = market.asks if side == "buy" else market.bids
        decimals = self.dialect.fee_decimals
        for fill_price, fill_qty in fills:
            _consume(book, fill_price, fill_qty)
            gross_quote = fill_price * fill_qty
            third = self._third_party_fee(market, gross_quote)
            if side == "buy":
                quote.free -= gross_quote
                base.free += fill_qty
            else:
                base.free -= fill_qty
                quote.free += gross_quote
            if third is not None:
                fee_asset, fee = third
            elif side == "buy" and self.dialect.fee_in == "received":
                fee_asset, fee = market.base, commission(fill_qty, market.taker_fee, decimals)
            else:
                fee_asset, fee = market.quote, commission(gross_quote, market.taker_fee, decimals)
            self.balances[fee_asset].free -= fee
            trade = Trade(
                id=self._next_trade_id,
                order_id=order.order_id,
                market_id=market.id,
                price=fill_price,
                qty=fill_qty,
                commission=fee,
                commission_asset=fee_asset,
                time=now,
                is_buyer=side == "buy",
            )
            self._next_trade_id += 1
            self.trades.append(trade)
            order.fills.append(trade)
            order.filled += fill_qty
            order.cost += gross_quote
            market.last_price = fill_price
        remaining = quantity - order.filled
        if remaining == 0:
            order.status = "filled"
        elif req.type == "market" or order.time_in_force in ("IOC", "FOK"):
            order.status = "expired"
        else:
            assert price is not None
            order.status = "partially_filled" if order.filled else "open"
            order.locked_asset = market.quote if side == "buy" else market.base
            order.locked = price * remaining if side == "buy" else remaining
            held = self.balances[order.locked_asset]
            held.free -= order.locked
            held.locked += order.locked
        self.balance_update_ms = now
        self.count(client_order_id, "accepted")
        if order.status == "filled":
            self.count(client_order_id, "filled")
        return order

    def _third_party_fee(self, market: Market, gross_quote: Decimal) -> tuple[str, Decimal] | None:
        """The fee in the configured fee asset, or None when none is set or the account cannot pay it."""
        if self._fee_asset is None:
            return None
        asset, price = self._fee_asset
        fee = commission(gross_quote / price, market.taker_fee, self.dialect.fee_decimals)
        held = self.balances.get(asset)
        if held is None or held.free < fee:
            return None
        return asset, fee

    def candles(
        self,
        market: Market,
        label: str,
        step_ms: int,
        limit: int,
        start: int | None,
        end: int | None,
        *,
        offset_ms: int = 0,
        decimals: int = 8,
    ) -> list[Candle]:
        """Deterministic candles around the current mid, oldest first: each candle's log return is plus or
        minus sigma (the snapshot's daily volatility scaled by sqrt(step / 1 day)), signs balanced in blocks
        of eight, so the realized volatility of any window of 30 or more candles is within a few percent of
        the snapshot's. The newest candle (still open) closes at the mid. No volatility: flat candles.
        `label` (the interval's name) seeds the signs; `offset_ms` shifts the candle grid (weekly candles
        opening on Monday)."""
        now = now_ms()
        current = (now - offset_ms) // step_ms  # index of the candle still open
        last = current if end is None else min(current, (end - offset_ms) // step_ms)
        if start is not None:
            first = -(-(start - offset_ms) // step_ms)
            last = min(last, first + limit - 1)
        else:
            first = last - limit + 1
        first = max(first, current - _MAX_KLINE_STEPS)
        if last < first:
            return []
        sigma = (market.volatility or Decimal(0)) * (Decimal(step_ms) / DAY_MS).sqrt()
        up = sigma.exp()
        # level[k] = log-price of close k in units of sigma, relative to the close of the open candle
        level: dict[int, int] = {current: 0}
        for k in range(current, first - 2, -1):
            level[k - 1] = level[k] - _sign_at(market.id, label, k)
        reference = market.mid()
        volume = market.book_volume()
        unit = Decimal(1).scaleb(-decimals)
        rows: list[Candle] = []
        for k in range(first, last + 1):
            open_ = (reference * up ** level[k - 1]).quantize(market.tick, rounding=ROUND_HALF_EVEN)
            close = (reference * up ** level[k]).quantize(market.tick, rounding=ROUND_HALF_EVEN)
            vol = (volume * (1 + Decimal(k % 7) / 10)).quantize(unit)
            rows.append(Candle(k * step_ms + offset_ms, open_, max(open_, close), min(open_, close), close, vol))
        return rows


# --- pure helpers of the engine ------------------------------------------------------------------


def tick_for(bids: list[list[Decimal]], asks: list[list[Decimal]], at_most: Decimal) -> Decimal:
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
        price, amount = to_decimal(level[0], "price"), to_decimal(level[1], "amount")
        if price <= 0 or amount <= 0:
            raise ValueError("price and amount of a book level must be above 0")
        if result and ((price >= result[-1][0]) if descending else (price <= result[-1][0])):
            raise ValueError("book levels must be best first with distinct prices")
        result.append([price, amount])
    return result


def _crosses(side: str, price: Decimal | None, best: Decimal) -> bool:
    if price is None:
        return True
    return price >= best if side == "buy" else price <= best


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


def _sign_at(market_id: str, label: str, index: int) -> int:
    block, position = divmod(index, 8)
    digest = hashlib.blake2b(f"{market_id}|{label}|{block}".encode(), digest_size=8).digest()
    pattern = _BALANCED_BLOCKS[int.from_bytes(digest, "big") % len(_BALANCED_BLOCKS)]
    return pattern[position]


# --- HTTP server ---------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: ccxt's requests session reuses the connection
    disable_nagle_algorithm = True  # without it each answer waits ~40 ms for the client's delayed ACK
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
        reply = emulator.handle(method, self.path, dict(self.headers.items()), body)
        if reply.action == "hang":
            emulator.wait(reply.hang_seconds)
        if reply.action != "send":
            self._drop()
            return
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = "Error"
        head = [
            f"HTTP/1.1 {reply.status} {phrase}",
            f"Server: {emulator.dialect.name}-emulator",
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


def start_emulator(snapshot: Path | str | Snapshot, *, exchange: str | Dialect, **options: Any) -> Emulator:
    """Start a loopback `exchange` (a registered dialect's name, or a dialect) serving `snapshot` on
    127.0.0.1; `options` are `Emulator`'s (`port=0`: any free port, `weight_limit`, `api_key`, ...)."""
    from rebalancer_cli.testing import load_dialect

    snap = snapshot if isinstance(snapshot, Snapshot) else load_snapshot(Path(snapshot))
    dialect = exchange if isinstance(exchange, Dialect) else load_dialect(exchange)
    return Emulator(snap, dialect=dialect, **options).start()


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
        validated_fault(kind, endpoint, method, count, params)  # fail here, not as an HTTP 400
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


def main(argv: Sequence[str] | None = None, *, default_exchange: str) -> int:
    """Serve until SIGTERM/SIGINT; the first line on stdout is the base URL, written once ready."""
    from rebalancer_cli.errors import InvalidFileError
    from rebalancer_cli.testing import DIALECTS, load_dialect

    parser = argparse.ArgumentParser(
        prog="python -m rebalancer_cli.testing.emulator",
        description="Loopback exchange emulator serving a snapshot file.",
    )
    parser.add_argument("--snapshot", required=True, type=Path, help="snapshot file (see `rebalance snapshot-schema`)")
    parser.add_argument("--exchange", choices=sorted(DIALECTS), default=default_exchange, help="REST dialect")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--api-key", default=None, help="accepted API key (default: the dialect's)")
    parser.add_argument("--secret", default=None, help="accepted secret (default: the dialect's)")
    parser.add_argument("--password", default=None, help="accepted passphrase, where the exchange has one")
    parser.add_argument("--weight-limit", type=int, default=None, help="limit of the first request budget")
    parser.add_argument("--weight-window", type=float, default=None, help="seconds of the budget window")
    parser.add_argument(
        "--client-order-id-scope",
        choices=("open", "any"),
        default="open",
        help="refuse a repeated client order id while that order is open (a filled one frees it) or always",
    )
    args = parser.parse_args(argv)
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
        exchange=load_dialect(args.exchange),
        port=args.port,
        weight_limit=args.weight_limit,
        weight_window=args.weight_window,
        api_key=args.api_key,
        secret=args.secret,
        password=args.password,
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
