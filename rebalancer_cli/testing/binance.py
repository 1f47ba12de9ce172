"""Binance spot REST, the dialect the real `ccxt.binance` client talks to over HTTP (hosted by `core.Emulator`).

The core (`core.py`) keeps balances, books, matching, fees, faults and counts; this module is what is
Binance's: the routes and their weights, the HMAC signature and `recvWindow`, the answer shapes, the error
codes, the client order id rule (`^[.A-Z:/a-z0-9_-]{1,36}$`) and the market ids (BTCUSDC).

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
`/__emulator__/`) for a server started as a subprocess; see `core.FaultControl` for the list.

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
HTTP 503, -1001 "Internal error; unable to process..."  OperationFailed (NOT a NetworkError: the
                                                        adapter must map it as transient)
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

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, ClassVar

from rebalancer_cli.testing.core import (
    DAY_MS,
    DEFAULT_API_KEY,
    DEFAULT_SECRET,
    MAX_NOTIONAL,
    MAX_PRICE,
    MAX_QTY,
    ApiError,
    Budget,
    Dialect,
    Market,
    Order,
    OrderRequest,
    Rejection,
    Request,
    Route,
    const,
    now_ms,
    plain,
)

DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60000
SAPI_WEIGHT_LIMIT = 12000

_EIGHT = Decimal("0.00000001")
_DECIMAL_RE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,20})?$")
_CLIENT_ID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")

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
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": 7 * DAY_MS,
}
# Binance's weekly candles open on Monday 00:00 UTC; the Unix epoch was a Thursday.
_INTERVAL_OFFSET_MS: dict[str, int] = {"1w": 4 * DAY_MS}

_AUTH_MESSAGES: dict[int, tuple[int, str]] = {
    -2014: (401, "API-key format invalid."),
    -2015: (401, "Invalid API-key, IP, or permissions for action."),
    -1022: (400, "Signature for this request is not valid."),
}
_INSUFFICIENT = "Account has insufficient balance for requested action."
_STATUS = {
    "open": "NEW",
    "partially_filled": "PARTIALLY_FILLED",
    "filled": "FILLED",
    "canceled": "CANCELED",
    "expired": "EXPIRED",
}
_TYPES = {"MARKET": "market", "LIMIT": "limit", "LIMIT_MAKER": "limit_maker"}


def _error(status: int, code: int, msg: str) -> ApiError:
    """A Binance error answer: HTTP status plus the `{"code", "msg"}` body ccxt maps to its classes."""
    return ApiError(status, {"code": code, "msg": msg})


def _bad(code: int, msg: str) -> ApiError:
    return _error(400, code, msg)


def _mandatory(name: str) -> ApiError:
    return _bad(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def _fmt(value: Decimal) -> str:
    """Binance writes amounts with 8 decimals; finer values are written exactly rather than rounded."""
    if value == 0:
        return "0.00000000"
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent >= -8:
        return f"{value:.8f}"
    return plain(value)


def _param_decimal(params: dict[str, Any], name: str) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _DECIMAL_RE.match(str(raw)):
        raise _bad(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^([0-9]{{1,20}})(\\.[0-9]{{1,20}})?$'.",
        )
    return Decimal(raw)


def _param_int(params: dict[str, Any], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not str(raw).lstrip("-").isdigit():
        raise _bad(-1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.")
    return int(raw)


def _depth_weight(params: dict[str, Any]) -> int:
    try:
        limit = int(params.get("limit", "100"))
    except ValueError:
        return 5
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


def _symbols_count(params: dict[str, Any]) -> int | None:
    try:
        symbols = json.loads(params["symbols"])
    except (KeyError, ValueError):
        return None
    return len(symbols) if isinstance(symbols, list) else None


def _ticker_24hr_weight(params: dict[str, Any]) -> int:
    if "symbol" in params:
        return 2
    count = _symbols_count(params)
    if count is None:
        return 80
    return 2 if count <= 20 else 40 if count <= 100 else 80


def _one_or_all_weight(one: int, many: int) -> Callable[[dict[str, Any]], int]:
    return lambda params: one if "symbol" in params else many


class BinanceDialect(Dialect):
    name = "binance"
    ccxt_id = "binance"
    credentials: ClassVar[dict[str, str]] = {"apiKey": DEFAULT_API_KEY, "secret": DEFAULT_SECRET}
    order_path = "/api/v3/order"
    budgets = (
        Budget("api", header="X-MBX-USED-WEIGHT-1M"),
        Budget("sapi", header="X-SAPI-USED-IP-WEIGHT-1M", limit=SAPI_WEIGHT_LIMIT, enforced=False),
    )
    weight_limit = 6000
    weight_window = 60.0
    fee_in = "received"
    fee_decimals = 8
    client_id_pattern = _CLIENT_ID_RE
    auth_codes = tuple(_AUTH_MESSAGES)
    default_auth_code = -2015
    ccxt_options: ClassVar[dict[str, Any]] = {
        "fetchMarkets": {"types": ["spot"]},
        "fetchCurrencies": False,
        "fetchMargins": False,
        "adjustForTimeDifference": False,
    }
    # ccxt sends recvWindow with every signed request: 1 s keeps recovery's settle waits at 2 s
    config_options: ClassVar[dict[str, Any]] = {"recvWindow": 1000}

    def routes(self) -> Mapping[tuple[str, str], Route]:
        return {
            ("GET", "/api/v3/ping"): Route(self._ping, const(1)),
            ("GET", "/api/v3/time"): Route(self._time, const(1)),
            ("GET", "/api/v3/exchangeInfo"): Route(self._exchange_info, const(20), name="markets"),
            ("GET", "/api/v3/depth"): Route(self._depth, _depth_weight, name="book"),
            ("GET", "/api/v3/klines"): Route(self._klines, const(2), name="candles"),
            ("GET", "/api/v3/ticker/bookTicker"): Route(self._book_ticker, _one_or_all_weight(2, 4), name="tickers"),
            ("GET", "/api/v3/ticker/price"): Route(self._ticker_price, _one_or_all_weight(2, 4)),
            ("GET", "/api/v3/ticker/24hr"): Route(self._ticker_24hr, _ticker_24hr_weight),
            ("GET", "/api/v3/account"): Route(self._account, const(20), signed=True, name="balance"),
            ("POST", "/api/v3/order"): Route(
                self._new_order, const(1), signed=True, places_order=True, name="create_order"
            ),
            ("POST", "/api/v3/order/test"): Route(self._test_order, const(1), signed=True),
            ("GET", "/api/v3/order"): Route(self._get_order, const(4), signed=True, name="fetch_order"),
            ("DELETE", "/api/v3/order"): Route(self._cancel_order, const(1), signed=True, name="cancel_order"),
            ("GET", "/api/v3/openOrders"): Route(self._open_orders, _one_or_all_weight(6, 80), signed=True),
            ("GET", "/api/v3/allOrders"): Route(self._all_orders, const(20), signed=True),
            ("GET", "/api/v3/myTrades"): Route(
                self._my_trades, lambda p: 5 if "orderId" in p else 20, signed=True, name="trades"
            ),
            ("GET", "/sapi/v1/system/status"): Route(self._system_status, const(1), budget="sapi"),
            ("GET", "/sapi/v1/asset/tradeFee"): Route(
                self._trade_fee, const(1), signed=True, budget="sapi", name="fees"
            ),
        }

    def market_id(self, base: str, quote: str) -> str:
        return f"{base}{quote}"

    def parse_params(self, method: str, query: str, body: str, headers: Mapping[str, str]) -> dict[str, Any]:
        from urllib.parse import parse_qsl

        params: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
        params.update(parse_qsl(body, keep_blank_values=True))
        return params

    # --- answers the core asks for ---------------------------------------------------------------

    def authenticate(self, request: Request) -> None:
        api_key = request.header("X-MBX-APIKEY")
        emulator = self.emulator
        if not api_key:
            raise _error(401, -2014, "API-key format invalid.")
        if not hmac.compare_digest(api_key.encode(), emulator.api_key.encode()):
            raise _error(401, -2015, "Invalid API-key, IP, or permissions for action.")
        params = request.params
        timestamp = _param_int(params, "timestamp")
        if timestamp is None:
            raise _mandatory("timestamp")
        recv_window = _param_decimal(params, "recvWindow")
        window_ms = DEFAULT_RECV_WINDOW_MS if recv_window is None else recv_window
        if window_ms > MAX_RECV_WINDOW_MS:
            raise _bad(-1131, "recvWindow must be less than 60000")
        now = now_ms()
        if timestamp >= now + 1000:
            raise _bad(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
        if now - timestamp > window_ms:
            raise _bad(-1021, "Timestamp for this request is outside of the recvWindow.")
        signature = params.get("signature")
        if not signature:
            raise _mandatory("signature")
        payload = _without_signature(request.query) + _without_signature(request.body)
        expected = hmac.new(emulator.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, str(signature).lower()):
            raise _bad(-1022, "Signature for this request is not valid.")

    def auth_refusal(self, code: int | str) -> ApiError:
        status, msg = _AUTH_MESSAGES[int(code)]
        return _error(status, int(code), msg)

    def render_rejection(self, rejection: Rejection) -> ApiError:
        reason = rejection.reason
        if reason == "filter":
            return _bad(-1013, f"Filter failure: {rejection.detail}")
        if reason == "duplicate_client_id":
            return _bad(-2010, "Duplicate order sent.")
        if reason == "insufficient_funds":
            return _bad(-2010, _INSUFFICIENT)
        if reason == "would_take":
            return _bad(-2010, "Order would immediately match and take.")
        if reason == "unknown_market":
            return _bad(-1121, "Invalid symbol.")
        return _bad(-2013, "Order does not exist.")

    def rate_limited(self, limit: int, used: int, retry_after: int) -> ApiError:
        return _error(
            429,
            -1003,
            f"Too much request weight used; current limit is {limit} request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        )

    def banned(self, limit: int, used: int, retry_after: int, until_ms: int) -> ApiError:
        return _error(
            418,
            -1003,
            f"Way too much request weight used; IP banned until {until_ms}. "
            "Please use WebSocket Streams for live updates to avoid bans.",
        )

    def unknown_route(self, method: str, path: str) -> ApiError:
        return _error(404, -1020, f"This operation is not supported: {method} {path}")

    def unknown_status(self) -> ApiError:
        return _error(
            408,
            -1007,
            "Timeout waiting for response from backend server. Send status unknown; execution status unknown.",
        )

    def internal_error(self, status: int) -> ApiError:
        return _error(status, -1001, "Internal error; unable to process your request. Please try again.")

    def extra_headers(self, route: Route, now: float) -> list[tuple[str, str]]:
        stamps = self.emulator.order_stamps
        while stamps and stamps[0] <= now - 86400:
            stamps.popleft()
        last_10s = sum(1 for stamp in stamps if stamp > now - 10)
        return [("X-MBX-ORDER-COUNT-10S", str(last_10s)), ("X-MBX-ORDER-COUNT-1D", str(len(stamps)))]

    # --- market data -----------------------------------------------------------------------------

    def _market(self, params: dict[str, Any], name: str = "symbol") -> Market:
        symbol = params.get(name)
        if not symbol:
            raise _mandatory(name)
        market = self.emulator.markets.get(str(symbol))
        if market is None:
            raise _bad(-1121, "Invalid symbol.")
        return market

    def _markets_param(self, params: dict[str, Any]) -> list[Market]:
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
        return list(self.emulator.markets.values())

    def _ping(self, req: Request) -> Any:
        return {}

    def _time(self, req: Request) -> Any:
        return {"serverTime": now_ms()}

    def _system_status(self, req: Request) -> Any:
        return {"status": 0, "msg": "normal"}

    def _exchange_info(self, req: Request) -> Any:
        markets = self._markets_param(req.params)
        return {
            "timezone": "UTC",
            "serverTime": now_ms(),
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": self.emulator.budget_limit("api"),
                },
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": [_symbol_info(m) for m in markets],
        }

    def _depth(self, req: Request) -> Any:
        market = self._market(req.params)
        limit = _param_int(req.params, "limit") or 100
        limit = max(1, min(limit, 5000))
        return {
            "lastUpdateId": self.emulator.update_id,
            "bids": [[_fmt(p), _fmt(a)] for p, a in market.bids[:limit]],
            "asks": [[_fmt(p), _fmt(a)] for p, a in market.asks[:limit]],
        }

    def _book_ticker(self, req: Request) -> Any:
        rows = [_book_row(m) for m in self._markets_param(req.params)]
        return rows[0] if "symbol" in req.params else rows

    def _ticker_price(self, req: Request) -> Any:
        rows = [{"symbol": m.id, "price": _fmt(m.last())} for m in self._markets_param(req.params)]
        return rows[0] if "symbol" in req.params else rows

    def _ticker_24hr(self, req: Request) -> Any:
        now = now_ms()
        rows = []
        for m in self._markets_param(req.params):
            last = m.last()
            book = _book_row(m)
            volume = m.book_volume()
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
                    "openTime": now - DAY_MS,
                    "closeTime": now,
                    "firstId": -1,
                    "lastId": -1,
                    "count": 0,
                }
            )
        return rows[0] if "symbol" in req.params else rows

    def _klines(self, req: Request) -> Any:
        market = self._market(req.params)
        interval = req.params.get("interval")
        if not interval:
            raise _mandatory("interval")
        if interval not in _INTERVAL_MS:
            raise _bad(-1120, "Invalid interval.")
        limit = _param_int(req.params, "limit") or 500
        limit = max(1, min(limit, 1000))
        step = _INTERVAL_MS[interval]
        candles = self.emulator.candles(
            market,
            interval,
            step,
            limit,
            _param_int(req.params, "startTime"),
            _param_int(req.params, "endTime"),
            offset_ms=_INTERVAL_OFFSET_MS.get(interval, 0),
        )
        return [
            [
                c.open_ms,
                _fmt(c.open),
                _fmt(c.high),
                _fmt(c.low),
                _fmt(c.close),
                _fmt(c.volume),
                c.open_ms + step - 1,
                _fmt((c.volume * c.close).quantize(_EIGHT)),
                100,
                _fmt((c.volume / 2).quantize(_EIGHT)),
                _fmt((c.volume * c.close / 2).quantize(_EIGHT)),
                "0",
            ]
            for c in candles
        ]

    # --- account ---------------------------------------------------------------------------------

    def _account(self, req: Request) -> Any:
        fee = self.emulator.account_fee()
        bps = int((fee * 10000).to_integral_value())
        omit_zero = str(req.params.get("omitZeroBalances", "false")).lower() == "true"
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
            "updateTime": self.emulator.balance_update_ms,
            "accountType": "SPOT",
            "balances": [
                {"asset": asset, "free": _fmt(b.free), "locked": _fmt(b.locked)}
                for asset, b in self.emulator.balances.items()
                if not (omit_zero and b.free == 0 and b.locked == 0)
            ],
            "permissions": ["SPOT"],
            "uid": 1,
        }

    def _trade_fee(self, req: Request) -> Any:
        markets = [self._market(req.params)] if "symbol" in req.params else list(self.emulator.markets.values())
        return [
            {"symbol": m.id, "makerCommission": plain(m.taker_fee), "takerCommission": plain(m.taker_fee)}
            for m in markets
        ]

    # --- orders ----------------------------------------------------------------------------------

    def _new_order(self, req: Request) -> Any:
        return self._place(req.params, test=False)

    def _test_order(self, req: Request) -> Any:
        return self._place(req.params, test=True)

    def _place(self, params: dict[str, Any], *, test: bool) -> Any:
        market = self._market(params)
        client_order_id = str(params.get("newClientOrderId") or self.emulator.generated_client_id())
        if not _CLIENT_ID_RE.match(client_order_id):
            raise _bad(
                -1100,
                "Illegal characters found in parameter 'newClientOrderId'; "
                "legal range is '^[\\.A-Z\\:/a-z0-9_-]{1,36}$'.",
            )
        order = self.emulator.submit(client_order_id, lambda: _order_request(market, params), test=test)
        if order is None:
            return {}
        return _order_reply(order, market, params.get("newOrderRespType") or "FULL")

    def _find_order(self, params: dict[str, Any], market: Market, code: int, msg: str) -> Order:
        order_id = _param_int(params, "orderId")
        client_id = params.get("origClientOrderId")
        if order_id is None and not client_id:
            raise _bad(-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!")
        found = self.emulator.find_order(market, order_id=order_id, client_order_id=client_id or None)
        if found is None:
            raise _bad(code, msg)
        return found

    def _get_order(self, req: Request) -> Any:
        market = self._market(req.params)
        order = self._find_order(req.params, market, -2013, "Order does not exist.")
        return _order_query(order, market)

    def _cancel_order(self, req: Request) -> Any:
        market = self._market(req.params)
        order = self._find_order(req.params, market, -2011, "Unknown order sent.")
        if not order.is_open:
            raise _bad(-2011, "Unknown order sent.")
        self.emulator.cancel(order)
        reply = _order_query(order, market)
        for key in ("stopPrice", "icebergQty", "time", "updateTime", "isWorking", "workingTime"):
            reply.pop(key, None)
        reply["origClientOrderId"] = order.client_order_id
        reply["clientOrderId"] = req.params.get("newClientOrderId") or self.emulator.generated_client_id()
        reply["transactTime"] = order.update_time
        return reply

    def _open_orders(self, req: Request) -> Any:
        market = self._market(req.params) if "symbol" in req.params else None
        return [
            _order_query(o, self.emulator.markets[o.market_id])
            for o in self.emulator.orders.values()
            if o.is_open and (market is None or o.market_id == market.id)
        ]

    def _all_orders(self, req: Request) -> Any:
        market = self._market(req.params)
        orders = [o for o in self.emulator.orders.values() if o.market_id == market.id]
        chosen = _page(orders, req.params, lambda o: o.order_id, lambda o: o.time, "orderId")
        return [_order_query(o, market) for o in chosen]

    def _my_trades(self, req: Request) -> Any:
        market = self._market(req.params)
        trades = [t for t in self.emulator.trades if t.market_id == market.id]
        order_id = _param_int(req.params, "orderId")
        if order_id is not None:
            trades = [t for t in trades if t.order_id == order_id]
        chosen = _page(trades, req.params, lambda t: t.id, lambda t: t.time, "fromId")
        return [
            {
                "symbol": t.market_id,
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


def _order_request(market: Market, params: dict[str, Any]) -> OrderRequest:
    """Binance's parameter checks of a new order, in Binance's order; the market's checks follow in the core."""
    side = params.get("side")
    if not side:
        raise _mandatory("side")
    if side not in ("BUY", "SELL"):
        raise _bad(-1117, "Invalid side.")
    order_type = params.get("type")
    if not order_type:
        raise _mandatory("type")
    if order_type not in _TYPES:
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
    return OrderRequest(
        market=market,
        side="buy" if side == "BUY" else "sell",
        type=_TYPES[order_type],  # type: ignore[arg-type]
        amount=quantity,
        quote_amount=quote_qty,
        price=price,
        time_in_force=tif,  # type: ignore[arg-type]
    )


def _page(
    items: list[Any],
    params: dict[str, Any],
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


def _symbol_info(m: Market) -> dict[str, Any]:
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
                "maxPrice": _fmt(MAX_PRICE),
                "tickSize": _fmt(m.tick),
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": _fmt(m.step),
                "maxQty": _fmt(MAX_QTY),
                "stepSize": _fmt(m.step),
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": _fmt(m.min_notional),
                "applyMinToMarket": True,
                "maxNotional": _fmt(MAX_NOTIONAL),
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
        ],
        "permissions": ["SPOT"],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def _book_row(m: Market) -> dict[str, str]:
    bid = m.bids[0] if m.bids else [Decimal(0), Decimal(0)]
    ask = m.asks[0] if m.asks else [Decimal(0), Decimal(0)]
    return {
        "symbol": m.id,
        "bidPrice": _fmt(bid[0]),
        "bidQty": _fmt(bid[1]),
        "askPrice": _fmt(ask[0]),
        "askQty": _fmt(ask[1]),
    }


def _without_signature(raw: str) -> str:
    if not raw:
        return ""
    return "&".join(part for part in raw.split("&") if not part.startswith("signature="))


def _order_query(o: Order, m: Market) -> dict[str, Any]:
    return {
        "symbol": m.id,
        "orderId": o.order_id,
        "orderListId": -1,
        "clientOrderId": o.client_order_id,
        "price": _fmt(o.price),
        "origQty": _fmt(o.amount),
        "executedQty": _fmt(o.filled),
        "cummulativeQuoteQty": _fmt(o.cost),
        "status": _STATUS[o.status],
        "timeInForce": o.time_in_force,
        "type": o.type.upper(),
        "side": o.side.upper(),
        "stopPrice": "0.00000000",
        "icebergQty": "0.00000000",
        "time": o.time,
        "updateTime": o.update_time,
        "isWorking": True,
        "workingTime": o.time,
        "origQuoteOrderQty": _fmt(o.quote_amount),
        "selfTradePreventionMode": "EXPIRE_MAKER",
    }


def _order_reply(o: Order, m: Market, resp_type: str) -> dict[str, Any]:
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
        "origQty": _fmt(o.amount),
        "executedQty": _fmt(o.filled),
        "origQuoteOrderQty": _fmt(o.quote_amount),
        "cummulativeQuoteQty": _fmt(o.cost),
        "status": _STATUS[o.status],
        "timeInForce": o.time_in_force,
        "type": o.type.upper(),
        "side": o.side.upper(),
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
    return BinanceDialect().client(base_url, {"apiKey": api_key, "secret": secret}, timeout_ms=timeout_ms, **options)
