"""OKX REST API v5 (spot), the dialect the real `ccxt.okx` client talks to over HTTP (hosted by `core.Emulator`).

The core (`core.py`) keeps balances, books, matching, fees, faults and counts; this module is what is
OKX's, as its v5 documentation (https://www.okx.com/docs-v5/en/) describes it and ccxt 4.5 drives it:

* Authentication ("REST Authentication"): `OK-ACCESS-KEY`, `OK-ACCESS-PASSPHRASE`, `OK-ACCESS-TIMESTAMP`
  (ISO 8601 UTC with milliseconds, `2020-12-08T09:08:57.715Z`) and `OK-ACCESS-SIGN`, the base64 of
  HMAC-SHA256(secret, timestamp + METHOD + requestPath [+ "?" + query] + body). A request whose timestamp
  is more than 30 s from the server's clock is refused with 50102 "Timestamp request expired": that is
  the whole validity window of a signed OKX request, and the settle window of the OKX profile rests on it.
  A demo-trading key answers only requests carrying `x-simulated-trading: 1` (what ccxt's
  `set_sandbox_mode` sends) and a live key only those without it: 50101 otherwise.
* Envelopes ("General Info", "Error Code"): every answer is `{"code": "0", "msg": "", "data": [...]}`;
  an error is the same shape with the code as a string. Order operations answer per order inside `data`
  (`sCode` / `sMsg`), with the outer `code` "1" ("All operations failed" for the batch endpoint ccxt
  uses, "Operation failed." for the single one), HTTP 200. Whole-request refusals carry the HTTP status
  OKX's table gives their code: auth 401, parameter errors (51000, 50014) 400, the rate limit 429
  `{"msg":"Too Many Requests","code":"50011"}`, internal errors 500 / 503.
* Client order ids ("Place order", `clOrdId`): 1-32 letters and digits, case-sensitive; anything else is
  refused with 51000 "Parameter clOrdId error". A repeated `clOrdId` is refused with 51016 "Client order
  ID already exists." while the earlier order is live; once it filled or was canceled the id is free
  again and a repeat TRADES AGAIN (`client_order_id_scope="open"`, the core's default). An IOC order is never live
  after its answer, so on OKX only a lookup by `clOrdId` protects a re-send, never the exchange.
* Orders: `POST /api/v5/trade/batch-orders` (ccxt's default, an array of one) and `/api/v5/trade/order`,
  `ordType` market / limit / post_only / fok / ioc with `px`, `sz` in base units (`tgtCcy` base_ccy;
  a spot market buy by default in quote units, `tgtCcy` quote_ccy), `tdMode` cash. The place answer
  carries ids and sCode only, no state and no fills: the order's outcome is read with
  `GET /api/v5/trade/order` (by `ordId` or `clOrdId`; the newest order with that id) and its fills with
  `GET /api/v5/trade/fills` / `fills-history`. Order states: live, partially_filled, filled, canceled
  (an IOC whose rest expired is canceled, with `accFillSz` what did fill). Fees are negative numbers
  (OKX writes a charge as a negative rebate), in the currency received.
* Market rules ("Get instruments"): `tickSz`, `lotSz` (the snapshot's amount step) and `minSz`. OKX
  publishes no minimum notional for spot: the snapshot's `min_notional` becomes `minSz` (the smallest
  lot multiple worth it at the snapshot's mid, `adopt`), checked as 51020 "Your order should meet or
  exceed the minimum order amount."; the core's notional check is off, as OKX has none.
* Transaction timeouts: an `expTime` header (Unix ms) on the order endpoints is a deadline; past it the
  request is not processed (50036). ccxt does not send it; the OKX profile can (`exchange.options.expTime`).
* Rate limits ("Rate Limits"): per endpoint, in a 2 s window (the core's sliding window of
  `weight_window` = 2 s). `faults.rate_limit(n)` sets the budget of the order endpoints.
* Candles (`GET /api/v5/market/candles`, `history-candles`): newest first, `[ts, o, h, l, c, vol,
  volCcy, volCcyQuote, confirm]`; bars 1m..4H, the UTC bars 6Hutc..1Wutc and their Hong Kong-time
  twins 6H..1W (aligned on UTC+8, as OKX does). Monthly bars are not modelled.

What the real ccxt 4.5 client raises for each answer (asserted in tests/test_emulator_okx.py):

==========================================================  ====================================
OKX answer                                                   ccxt exception class
==========================================================  ====================================
HTTP 429, code 50011                                         RateLimitExceeded (ccxt reads the
                                                             body before the status; a 429
                                                             without a JSON body would be
                                                             ExchangeNotAvailable)
HTTP 500 / 502 / 503 (not JSON)                              ExchangeNotAvailable
HTTP 504                                                     RequestTimeout
code 50004 "API endpoint request timeout ..."                RequestTimeout (outcome unknown)
sCode 51016 "Client order ID already exists."                InvalidOrder
sCode 51000 "Parameter clOrdId error" / "... px error"     BadRequest
sCode 51020 (below minSz), 51121 (lot)                      InvalidOrder
sCode 51008 / 51131 (insufficient balance)                   InsufficientFunds
code 51603 "Order does not exist" (query)                    OrderNotFound
sCode 51400 (cancel: filled, canceled or unknown)            OrderNotFound
code 51001 "Instrument ID does not exist"                    BadSymbol
50111 / 50113 / 50105 / 50101 / 50103..50107                 AuthenticationError
50102 "Timestamp request expired."                           InvalidNonce (a NetworkError)
50036 (expTime passed: not processed)                        ExchangeError (not in ccxt's table)
50026 (HTTP 500) internal error                              ExchangeNotAvailable
50001 (HTTP 503) "Service temporarily unavailable"           OnMaintenance
==========================================================  ====================================
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_UP, Decimal
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from rebalancer_cli.testing.core import (
    DAY_MS,
    DEFAULT_API_KEY,
    DEFAULT_PASSWORD,
    DEFAULT_SECRET,
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

REQUEST_VALIDITY_MS = 30_000  # "REST Authentication": a timestamp more than 30 s off is refused
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_DECIMAL_RE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,30})?$")
_TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
_HOUR_MS = 3_600_000
_HK_OFFSET_MS = 16 * _HOUR_MS  # OKX's non-UTC bars open at 00:00 Hong Kong time, 16:00 UTC the day before
# Monday 00:00 UTC, on the grid of weekly bars: the Unix epoch was a Thursday
_WEEK_OFFSET_MS = 4 * DAY_MS

_BARS: dict[str, tuple[int, int]] = {
    "1m": (60_000, 0),
    "3m": (180_000, 0),
    "5m": (300_000, 0),
    "15m": (900_000, 0),
    "30m": (1_800_000, 0),
    "1H": (_HOUR_MS, 0),
    "2H": (2 * _HOUR_MS, 0),
    "4H": (4 * _HOUR_MS, 0),
    "6Hutc": (6 * _HOUR_MS, 0),
    "12Hutc": (12 * _HOUR_MS, 0),
    "1Dutc": (DAY_MS, 0),
    "2Dutc": (2 * DAY_MS, 0),
    "3Dutc": (3 * DAY_MS, 0),
    "1Wutc": (7 * DAY_MS, _WEEK_OFFSET_MS),
    "6H": (6 * _HOUR_MS, _HK_OFFSET_MS % (6 * _HOUR_MS)),
    "12H": (12 * _HOUR_MS, _HK_OFFSET_MS % (12 * _HOUR_MS)),
    "1D": (DAY_MS, _HK_OFFSET_MS),
    "2D": (2 * DAY_MS, _HK_OFFSET_MS),
    "3D": (3 * DAY_MS, _HK_OFFSET_MS),
    "1W": (7 * DAY_MS, (_WEEK_OFFSET_MS - 8 * _HOUR_MS) % (7 * DAY_MS)),
}

# "Error Code" section: REST authentication refusals, all HTTP 401
_AUTH_MESSAGES: dict[str, str] = {
    "50101": "APIKey does not match current environment.",
    "50102": "Timestamp request expired.",
    "50103": 'Request header "OK-ACCESS-KEY" cannot be empty.',
    "50104": 'Request header "OK-ACCESS-PASSPHRASE" cannot be empty.',
    "50105": 'Request header "OK-ACCESS-PASSPHRASE" incorrect.',
    "50106": 'Request header "OK-ACCESS-SIGN" cannot be empty.',
    "50107": 'Request header "OK-ACCESS-TIMESTAMP" cannot be empty.',
    "50111": "Invalid OK-ACCESS-KEY.",
    "50112": "Invalid OK-ACCESS-TIMESTAMP.",
    "50113": "Invalid signature.",
}
_NO_INSTRUMENT = "Instrument ID or Spread ID doesn't exist."
_EXPIRED = "The expTime can't be earlier than the current system time. Please adjust the expTime and try again."
_BELOW_MIN_SIZE = "Your order should meet or exceed the minimum order amount."
_STATE = {
    "open": "live",
    "partially_filled": "partially_filled",
    "filled": "filled",
    "canceled": "canceled",
    "expired": "canceled",  # an IOC / FOK / market order whose rest did not trade: OKX says canceled
}
_ORD_TYPES: dict[str, tuple[str, str]] = {  # OKX ordType -> (core type, time in force)
    "market": ("market", ""),
    "limit": ("limit", "GTC"),
    "post_only": ("limit_maker", ""),
    "fok": ("limit", "FOK"),
    "ioc": ("limit", "IOC"),
}
_OKX_TYPE = {("market", ""): "market", ("limit", "GTC"): "limit", ("limit_maker", "GTC"): "post_only"}
_OKX_TYPE |= {("limit", "FOK"): "fok", ("limit", "IOC"): "ioc", ("limit_maker", ""): "post_only"}


def _envelope(code: str, msg: str, data: list[Any] | None = None) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data if data is not None else []}


# "Error Code": the HTTP status of each whole-request refusal (200 for the rest)
_HTTP_STATUS = {"50000": 400, "50001": 503, "50002": 400, "50004": 400, "50014": 400, "50026": 500, "51000": 400}


def _error(code: str, msg: str, status: int | None = None) -> ApiError:
    """A whole-request refusal: the envelope with an error code, at the HTTP status OKX gives that code."""
    return ApiError(status or _HTTP_STATUS.get(code, 200), _envelope(code, msg))


def _order_error(code: str, msg: str, client_id: str = "", *, batch: bool = True) -> ApiError:
    """A refused order: outer code "1", the reason per order in `data` (`sCode`, `sMsg`)."""
    ts = str(now_ms())
    entry = {"clOrdId": client_id, "ordId": "", "tag": "", "ts": ts, "sCode": code, "sMsg": msg}
    payload = _envelope("1", "All operations failed" if batch else "Operation failed.", [entry])
    payload["inTime"] = payload["outTime"] = ts + "000"
    return ApiError(200, payload)


def _per_order(error: ApiError, client_id: str, batch: bool) -> ApiError:
    """A refusal of a whole request (`code`, `msg`) or of one order, as the answer of an order operation."""
    payload = error.payload
    entry = payload["data"][0] if payload.get("code") == "1" and payload.get("data") else payload
    code = str(entry.get("sCode") or entry.get("code"))
    msg = str(entry.get("sMsg") or entry.get("msg"))
    return _order_error(code, msg, client_id, batch=batch)


def _fmt(value: Decimal) -> str:
    """OKX writes numbers as plain decimal strings without padding zeros."""
    return plain(value) if value else "0"


def _decimal(params: Mapping[str, Any], name: str) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    text = str(raw)
    if not _DECIMAL_RE.match(text):
        raise _error("51000", f"Parameter {name} error")
    return Decimal(text)


def _integer(params: Mapping[str, Any], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not str(raw).isdigit():
        raise _error("51000", f"Parameter {name} error")
    return int(raw)


def _parse_timestamp(text: str) -> int | None:
    """Milliseconds of an `OK-ACCESS-TIMESTAMP`, None when it is not ISO 8601 UTC with milliseconds."""
    if not _TIMESTAMP_RE.match(text):
        return None
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)


def _ceil_to(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_UP) * step


class OkxDialect(Dialect):
    name = "okx"
    ccxt_id = "okx"
    credentials: ClassVar[dict[str, str]] = {
        "apiKey": DEFAULT_API_KEY,
        "secret": DEFAULT_SECRET,
        "password": DEFAULT_PASSWORD,
    }
    order_path = "/api/v5/trade/batch-orders"
    # "Rate Limits": each endpoint has its own budget per 2 s. The first (the order endpoints, 60 per 2 s
    # per instrument on OKX) is the one `weight_limit` and `faults.rate_limit` set.
    budgets = (
        Budget("trade"),
        Budget("instruments", limit=20),
        Budget("tickers", limit=20),
        Budget("books", limit=40),
        Budget("candles", limit=40),
        Budget("balance", limit=10),
        Budget("trade-fee", limit=5),
        Budget("fills", limit=60),
        Budget("fills-history", limit=10),
        Budget("currencies", limit=6),
        Budget("time", limit=10),
    )
    weight_limit = 60
    weight_window = 2.0
    fee_in = "received"
    fee_decimals = 18  # OKX charges the exact rate (e.g. -0.000007533 ETH), no rounding at 8 decimals
    max_tick = Decimal("0.1")
    client_id_pattern = _CLIENT_ID_RE
    auth_codes = tuple(_AUTH_MESSAGES)
    default_auth_code = "50111"
    ccxt_options: ClassVar[dict[str, Any]] = {"fetchMarkets": {"types": ["spot"]}}
    # the OKX profile signs order requests with OKX's own `expTime` deadline (1 s): recovery's settle waits
    # are 3 s instead of the 32 s that the bare 30 s validity of a signed request would take
    config_options: ClassVar[dict[str, Any]] = {"expTime": 1000}

    def __init__(self, *, simulated: bool = False) -> None:
        """`simulated`: play OKX's demo trading (a demo key, answering only `x-simulated-trading: 1`)."""
        self.simulated = simulated
        self._min_size: dict[str, Decimal] = {}

    def routes(self) -> Mapping[tuple[str, str], Route]:
        one = const(1)
        return {
            ("GET", "/api/v5/public/time"): Route(self._time, one, budget="time"),
            ("GET", "/api/v5/public/instruments"): Route(self._instruments, one, budget="instruments", name="markets"),
            ("GET", "/api/v5/market/tickers"): Route(self._tickers, one, budget="tickers", name="tickers"),
            ("GET", "/api/v5/market/ticker"): Route(self._ticker, one, budget="tickers"),
            ("GET", "/api/v5/market/books"): Route(self._books, one, budget="books", name="book"),
            ("GET", "/api/v5/market/candles"): Route(self._candles, one, budget="candles", name="candles"),
            ("GET", "/api/v5/market/history-candles"): Route(
                self._history_candles, one, budget="candles", name="candles"
            ),
            ("GET", "/api/v5/asset/currencies"): Route(self._currencies, one, signed=True, budget="currencies"),
            ("GET", "/api/v5/account/balance"): Route(
                self._balance, one, signed=True, budget="balance", name="balance"
            ),
            ("GET", "/api/v5/account/trade-fee"): Route(
                self._trade_fee, one, signed=True, budget="trade-fee", name="fees"
            ),
            ("POST", "/api/v5/trade/batch-orders"): Route(
                self._batch_orders, _batch_weight, signed=True, places_order=True, name="create_order"
            ),
            ("POST", "/api/v5/trade/order"): Route(
                self._order, one, signed=True, places_order=True, name="create_order"
            ),
            ("GET", "/api/v5/trade/order"): Route(self._get_order, one, signed=True, name="fetch_order"),
            ("POST", "/api/v5/trade/cancel-order"): Route(self._cancel_order, one, signed=True, name="cancel_order"),
            ("GET", "/api/v5/trade/orders-pending"): Route(self._orders_pending, one, signed=True),
            ("GET", "/api/v5/trade/fills"): Route(self._fills, one, signed=True, budget="fills", name="trades"),
            ("GET", "/api/v5/trade/fills-history"): Route(
                self._fills, one, signed=True, budget="fills-history", name="trades"
            ),
        }

    def market_id(self, base: str, quote: str) -> str:
        return f"{base}-{quote}"

    def parse_params(self, method: str, query: str, body: str, headers: Mapping[str, str]) -> dict[str, Any]:
        """Query string plus a JSON body; the batch endpoint's body is an array, kept under `orders`."""
        params: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
        text = body.strip()
        if not text:
            return params
        try:
            doc = json.loads(text)
        except ValueError:
            params["__malformed__"] = True
            return params
        if isinstance(doc, list):
            params["orders"] = doc
        elif isinstance(doc, dict):
            params.update(doc)
        else:
            params["__malformed__"] = True
        return params

    # --- answers the core asks for ---------------------------------------------------------------

    def authenticate(self, request: Request) -> None:
        emulator = self.emulator
        key = request.header("OK-ACCESS-KEY")
        passphrase = request.header("OK-ACCESS-PASSPHRASE")
        sign = request.header("OK-ACCESS-SIGN")
        stamp = request.header("OK-ACCESS-TIMESTAMP")
        for value, code in ((key, "50103"), (passphrase, "50104"), (sign, "50106"), (stamp, "50107")):
            if not value:
                raise self.auth_refusal(code)
        assert key is not None and passphrase is not None and sign is not None and stamp is not None
        if not hmac.compare_digest(key.encode(), emulator.api_key.encode()):
            raise self.auth_refusal("50111")
        if (request.header("x-simulated-trading") == "1") != self.simulated:
            raise self.auth_refusal("50101")
        sent = _parse_timestamp(stamp)
        if sent is None:
            raise self.auth_refusal("50112")
        if abs(now_ms() - sent) > REQUEST_VALIDITY_MS:
            raise self.auth_refusal("50102")
        if not hmac.compare_digest(passphrase.encode(), emulator.password.encode()):
            raise self.auth_refusal("50105")
        path = request.path + (f"?{request.query}" if request.query else "")
        payload = stamp + request.method + path + request.body
        digest = hmac.new(emulator.secret.encode(), payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64encode(digest).decode(), sign):
            raise self.auth_refusal("50113")
        if request.method == "POST" and request.params.get("__malformed__"):
            raise _error("50002", "JSON syntax error")

    def auth_refusal(self, code: int | str) -> ApiError:
        return _error(str(code), _AUTH_MESSAGES[str(code)], 401)

    def render_rejection(self, rejection: Rejection) -> ApiError:
        """Refusals of the core's checks, in OKX's words ("Error Code", trade class 51xxx)."""
        reason, detail = rejection.reason, rejection.detail
        if reason == "filter":
            if detail == "LOT_SIZE":
                return _order_error("51121", "Order quantity must be a multiple of the lot size.")
            if detail == "PRICE_FILTER":
                return _order_error("51000", "Parameter px error")
            return _order_error("51020", _BELOW_MIN_SIZE)
        if reason == "duplicate_client_id":
            return _order_error("51016", "Client order ID already exists.", detail)
        if reason == "insufficient_funds":
            return _order_error("51008", f"Order failed. Insufficient {detail or 'account'} balance in account")
        if reason == "would_take":
            return _order_error("51000", "Post only order can't be filled immediately.")  # OKX cancels it
        if reason == "unknown_market":
            return _error("51001", _NO_INSTRUMENT)
        return _error("51603", "Order does not exist.")

    def rate_limited(self, limit: int, used: int, retry_after: int) -> ApiError:
        return ApiError(429, {"msg": "Too Many Requests", "code": "50011"})

    def unknown_route(self, method: str, path: str) -> ApiError:
        return ApiError(404, {"msg": "Not Found", "code": "404"})

    def unknown_status(self) -> ApiError:
        return _error(
            "50004",
            "API endpoint request timeout. (does not mean that the request was successful or failed, "
            "please check the request result).",
        )

    def internal_error(self, status: int) -> ApiError:
        if status == 503:
            return _error("50001", "Service temporarily unavailable. Please try again later.", status)
        return _error("50026", "System error. Try again later", status)

    def adopt(self, market: Market) -> None:
        """OKX has a minimum size (`minSz`), not a minimum notional: the snapshot's `min_notional` becomes
        the smallest lot multiple worth it at the snapshot's mid, and the core's notional check is off."""
        self._min_size[market.id] = min_size(market)
        market.min_notional = Decimal(0)

    # --- market data -------------------------------------------------------------------------

    def _market(self, params: Mapping[str, Any]) -> Market:
        inst_id = params.get("instId")
        if not inst_id:
            raise _error("50014", "Parameter instId can not be empty.")
        market = self.emulator.markets.get(str(inst_id))
        if market is None:
            raise _error("51001", _NO_INSTRUMENT)
        return market

    def _spot_only(self, params: Mapping[str, Any]) -> None:
        inst_type = params.get("instType")
        if not inst_type:
            raise _error("50014", "Parameter instType can not be empty.")
        if inst_type != "SPOT":
            raise _error("51000", "Parameter instType error")

    def _time(self, req: Request) -> Any:
        return _envelope("0", "", [{"ts": str(now_ms())}])

    def _instruments(self, req: Request) -> Any:
        self._spot_only(req.params)
        markets = list(self.emulator.markets.values())
        if req.params.get("instId"):
            markets = [self._market(req.params)]
        return _envelope("0", "", [self._instrument(m) for m in markets])

    def _instrument(self, m: Market) -> dict[str, Any]:
        return {
            "instType": "SPOT",
            "instId": m.id,
            "uly": "",
            "instFamily": "",
            "baseCcy": m.base,
            "quoteCcy": m.quote,
            "settleCcy": "",
            "ctVal": "",
            "ctMult": "",
            "ctValCcy": "",
            "optType": "",
            "stk": "",
            "listTime": "1606468572000",
            "expTime": "",
            "lever": "",
            "tickSz": _fmt(m.tick),
            "lotSz": _fmt(m.step),
            "minSz": _fmt(self._min_size[m.id]),
            "ctType": "",
            "alias": "",
            "state": "live",
            "ruleType": "normal",
            "maxLmtSz": _fmt(MAX_QTY),
            "maxMktSz": "1000000",
            "maxLmtAmt": "20000000",
            "maxMktAmt": "1000000",
            "maxTwapSz": _fmt(MAX_QTY),
            "maxIcebergSz": _fmt(MAX_QTY),
            "maxTriggerSz": _fmt(MAX_QTY),
            "maxStopSz": "1000000",
            "category": "1",
        }

    def _ticker_row(self, m: Market) -> dict[str, Any]:
        bid = m.bids[0] if m.bids else [Decimal(0), Decimal(0)]
        ask = m.asks[0] if m.asks else [Decimal(0), Decimal(0)]
        last = m.last()
        volume = m.book_volume()
        return {
            "instType": "SPOT",
            "instId": m.id,
            "last": _fmt(last),
            "lastSz": "0",
            "askPx": _fmt(ask[0]) if m.asks else "",
            "askSz": _fmt(ask[1]) if m.asks else "",
            "bidPx": _fmt(bid[0]) if m.bids else "",
            "bidSz": _fmt(bid[1]) if m.bids else "",
            "open24h": _fmt(last),
            "high24h": _fmt(ask[0] if m.asks else last),
            "low24h": _fmt(bid[0] if m.bids else last),
            "volCcy24h": _fmt(volume * last),
            "vol24h": _fmt(volume),
            "ts": str(now_ms()),
            "sodUtc0": _fmt(last),
            "sodUtc8": _fmt(last),
        }

    def _tickers(self, req: Request) -> Any:
        self._spot_only(req.params)
        return _envelope("0", "", [self._ticker_row(m) for m in self.emulator.markets.values()])

    def _ticker(self, req: Request) -> Any:
        return _envelope("0", "", [self._ticker_row(self._market(req.params))])

    def _books(self, req: Request) -> Any:
        market = self._market(req.params)
        size = _integer(req.params, "sz") or 1
        if size > 400:
            raise _error("51000", "Parameter sz error")
        return _envelope(
            "0",
            "",
            [
                {
                    "asks": [[_fmt(p), _fmt(a), "0", "1"] for p, a in market.asks[:size]],
                    "bids": [[_fmt(p), _fmt(a), "0", "1"] for p, a in market.bids[:size]],
                    "ts": str(now_ms()),
                }
            ],
        )

    def _candles(self, req: Request) -> Any:
        return self._candle_rows(req.params, default_limit=100, max_limit=300)

    def _history_candles(self, req: Request) -> Any:
        return self._candle_rows(req.params, default_limit=100, max_limit=100)

    def _candle_rows(self, params: Mapping[str, Any], *, default_limit: int, max_limit: int) -> Any:
        """`after`: older than that time; `before`: newer than it; the newest `limit` first."""
        market = self._market(params)
        bar = str(params.get("bar") or "1m")
        if bar not in _BARS:
            raise _error("51000", "Parameter bar error")
        step, offset = _BARS[bar]
        limit = max(1, min(_integer(params, "limit") or default_limit, max_limit))
        after = _integer(params, "after")
        before = _integer(params, "before")
        end = after - 1 if after is not None else None
        candles = self.emulator.candles(market, bar, step, 100_000 if before else limit, None, end, offset_ms=offset)
        if before is not None:
            candles = [c for c in candles if c.open_ms > before]
        candles = candles[-limit:]
        current = (now_ms() - offset) // step * step + offset
        rows = [
            [
                str(c.open_ms),
                _fmt(c.open),
                _fmt(c.high),
                _fmt(c.low),
                _fmt(c.close),
                _fmt(c.volume),
                _fmt(c.volume * c.close),
                _fmt(c.volume * c.close),
                "0" if c.open_ms == current else "1",
            ]
            for c in reversed(candles)
        ]
        return _envelope("0", "", rows)

    # --- account -----------------------------------------------------------------------------

    def _currencies(self, req: Request) -> Any:
        assets = sorted(self.emulator.balances)
        return _envelope(
            "0",
            "",
            [
                {
                    "ccy": asset,
                    "chain": f"{asset}-{asset}",
                    "name": asset,
                    "canDep": True,
                    "canWd": True,
                    "canInternal": True,
                    "minWd": "0.0001",
                    "maxWd": "1000000",
                    "wdTickSz": "8",
                    "minFee": "0",
                    "maxFee": "0",
                    "mainNet": True,
                }
                for asset in assets
            ],
        )

    def _balance(self, req: Request) -> Any:
        """The trading account in spot mode: `availBal` free, `frozenBal` held by open orders."""
        wanted = set(str(req.params.get("ccy") or "").split(",")) - {""}
        emulator = self.emulator
        details = []
        for asset, b in emulator.balances.items():
            if (wanted and asset not in wanted) or (not wanted and b.free == 0 and b.locked == 0):
                continue
            total = b.free + b.locked
            details.append(
                {
                    "ccy": asset,
                    "eq": _fmt(total),
                    "cashBal": _fmt(total),
                    "availBal": _fmt(b.free),
                    "frozenBal": _fmt(b.locked),
                    "ordFrozen": _fmt(b.locked),
                    "availEq": "",
                    "disEq": "",
                    "eqUsd": "",
                    "isoEq": "",
                    "liab": "",
                    "upl": "",
                    "uTime": str(emulator.balance_update_ms),
                }
            )
        return _envelope(
            "0", "", [{"adjEq": "", "details": details, "totalEq": "", "uTime": str(emulator.balance_update_ms)}]
        )

    def _trade_fee(self, req: Request) -> Any:
        """The account's fee rates; OKX writes a charge as a negative number."""
        self._spot_only(req.params)
        fee = self._market(req.params).taker_fee if req.params.get("instId") else self.emulator.account_fee()
        rate = _fmt(-fee) if fee else "0"
        return _envelope(
            "0",
            "",
            [
                {
                    "category": "1",
                    "delivery": "",
                    "exercise": "",
                    "instType": "SPOT",
                    "level": "Lv1",
                    "maker": rate,
                    "taker": rate,
                    "makerU": "",
                    "takerU": "",
                    "ts": str(now_ms()),
                }
            ],
        )

    # --- orders --------------------------------------------------------------------------------

    def _batch_orders(self, req: Request) -> Any:
        orders = req.params.get("orders")
        if not isinstance(orders, list) or not orders:
            raise _error("50000", "Body for POST request cannot be empty.")
        if len(orders) > 20:
            raise _error("51111", "Maximum 20 orders can be placed in bulk.")
        if not all(isinstance(o, dict) for o in orders):
            raise _error("50002", "JSON syntax error")
        if len(orders) > 1:
            # the emulator places one order per request, as ccxt's createOrder does
            raise _error("51000", "Parameter orders error")
        return self._place(req, orders[0], batch=True)

    def _order(self, req: Request) -> Any:
        return self._place(req, req.params, batch=False)

    def _place(self, req: Request, params: Mapping[str, Any], *, batch: bool) -> Any:
        """One order; every refusal is answered per order (`sCode` / `sMsg` under the outer code "1").

        "Transaction timeouts": with an `expTime` header (Unix ms) the request is not processed once the
        server's clock is past it, a deadline shorter than the 30 s of the signature."""
        deadline = req.header("expTime")
        if deadline is not None:
            if not deadline.isdigit():
                raise _error("51000", "Parameter expTime error")
            if now_ms() > int(deadline):
                raise _error("50036", _EXPIRED)
        client_id = str(params.get("clOrdId") or "")
        if client_id and not _CLIENT_ID_RE.match(client_id):
            raise _order_error("51000", "Parameter clOrdId error", client_id, batch=batch)
        try:
            market = self._market(params)
            minimum = self._min_size[market.id]
            order = self.emulator.submit(
                client_id or self.emulator.generated_client_id(), lambda: _order_request(market, params, minimum)
            )
        except Rejection as rejection:
            if rejection.reason == "insufficient_funds":  # OKX names the currency short
                rejection = Rejection(rejection.reason, market.quote if params.get("side") == "buy" else market.base)
            raise _per_order(self.render_rejection(rejection), client_id, batch) from None
        except ApiError as exc:
            raise _per_order(exc, client_id, batch) from None
        assert order is not None
        ts = str(order.time)
        entry = {
            "clOrdId": client_id,
            "ordId": str(order.order_id),
            "tag": str(params.get("tag") or ""),
            "ts": ts,
            "sCode": "0",
            "sMsg": "Order placed",
        }
        return {**_envelope("0", "", [entry]), "inTime": ts + "000", "outTime": ts + "000"}

    def _find(self, params: Mapping[str, Any], market: Market) -> Order | None:
        order_id = _integer(params, "ordId")
        client_id = params.get("clOrdId")
        if order_id is None and not client_id:
            raise _error("51003", "Either client order ID or order ID is required.")
        if order_id is not None:  # "if both are passed, ordId will be used"
            return self.emulator.find_order(market, order_id=order_id)
        return self.emulator.find_order(market, client_order_id=str(client_id))

    def _get_order(self, req: Request) -> Any:
        market = self._market(req.params)
        order = self._find(req.params, market)
        if order is None:
            raise _error("51603", "Order does not exist.")
        return _envelope("0", "", [_order_details(order, market)])

    def _cancel_order(self, req: Request) -> Any:
        client_id = str(req.params.get("clOrdId") or "")
        market = self._market(req.params)
        order = self._find(req.params, market)
        if order is None or not order.is_open:
            raise _order_error(
                "51400",
                "Order cancellation failed as the order has been filled, canceled or does not exist.",
                client_id,
                batch=False,
            )
        self.emulator.cancel(order)
        entry = {
            "clOrdId": order.client_order_id,
            "ordId": str(order.order_id),
            "ts": str(order.update_time),
            "sCode": "0",
            "sMsg": "",
        }
        return _envelope("0", "", [entry])

    def _orders_pending(self, req: Request) -> Any:
        market = self._market(req.params) if req.params.get("instId") else None
        rows = [
            _order_details(o, self.emulator.markets[o.market_id])
            for o in reversed(self.emulator.orders.values())
            if o.is_open and (market is None or o.market_id == market.id)
        ]
        return _envelope("0", "", rows)

    def _fills(self, req: Request) -> Any:
        """Transaction details, newest first; `ordId` narrows them to one order."""
        self._spot_only(req.params)
        market = self._market(req.params) if req.params.get("instId") else None
        order_id = _integer(req.params, "ordId")
        limit = max(1, min(_integer(req.params, "limit") or 100, 100))
        emulator = self.emulator
        rows = []
        for t in reversed(emulator.trades):
            if (market is not None and t.market_id != market.id) or (order_id is not None and t.order_id != order_id):
                continue
            order = emulator.orders[t.order_id]
            rows.append(
                {
                    "instType": "SPOT",
                    "instId": t.market_id,
                    "tradeId": str(t.id),
                    "ordId": str(t.order_id),
                    "clOrdId": order.client_order_id,
                    "billId": str(t.id),
                    "subType": "1" if t.is_buyer else "2",
                    "tag": "",
                    "fillPx": _fmt(t.price),
                    "fillSz": _fmt(t.qty),
                    "fillIdxPx": "",
                    "fillPnl": "0",
                    "fillPxVol": "",
                    "fillPxUsd": "",
                    "fillMarkVol": "",
                    "fillFwdPx": "",
                    "fillMarkPx": "",
                    "side": "buy" if t.is_buyer else "sell",
                    "posSide": "net",
                    "execType": "M" if t.is_maker else "T",
                    "feeCcy": t.commission_asset,
                    "fee": _fmt(-t.commission),
                    "ts": str(t.time),
                    "fillTime": str(t.time),
                    "feeRate": _fmt(-(t.commission / t.qty if t.is_buyer else t.commission / t.quote_qty)),
                }
            )
            if len(rows) == limit:
                break
        return _envelope("0", "", rows)


def min_size(m: Market) -> Decimal:
    """OKX's `minSz` for a snapshot market: the lot size, or the smallest lot multiple worth the snapshot's
    `min_notional` at its mid (OKX publishes a minimum size, not a minimum notional)."""
    if m.min_notional <= 0 or m.reference <= 0:
        return m.step
    return max(m.step, _ceil_to(m.min_notional / m.reference, m.step))


def _batch_weight(params: dict[str, Any]) -> int:
    """ "Place multiple orders" counts each order against the per-instrument order limit."""
    orders = params.get("orders")
    return len(orders) if isinstance(orders, list) and orders else 1


def _order_request(market: Market, params: Mapping[str, Any], minimum: Decimal) -> OrderRequest:
    """OKX's parameter checks of a new order ("Place order"); the market's checks follow in the core."""
    side = params.get("side")
    if not side:
        raise _error("50014", "Parameter side can not be empty.")
    if side not in ("buy", "sell"):
        raise _error("51000", "Parameter side error")
    td_mode = params.get("tdMode")
    if not td_mode:
        raise _error("50014", "Parameter tdMode can not be empty.")
    if td_mode != "cash":
        raise _error("51000", "Parameter tdMode error")
    ord_type = params.get("ordType")
    if not ord_type:
        raise _error("50014", "Parameter ordType can not be empty.")
    if ord_type not in _ORD_TYPES:
        raise _error("51000", "Parameter ordType error")
    core_type, tif = _ORD_TYPES[str(ord_type)]
    size = _decimal(params, "sz")
    if size is None:
        raise _error("50014", "Parameter sz can not be empty.")
    if size <= 0:
        raise _error("51000", "Parameter sz error")
    price = _decimal(params, "px")
    tgt_ccy = params.get("tgtCcy") or ("quote_ccy" if ord_type == "market" and side == "buy" else "base_ccy")
    if tgt_ccy not in ("base_ccy", "quote_ccy"):
        raise _error("51000", "Parameter tgtCcy error")
    amount: Decimal | None = size
    quote_amount: Decimal | None = None
    if core_type == "market":
        price = None  # "px: only applicable to limit orders"
        if tgt_ccy == "quote_ccy":
            amount, quote_amount = None, size
    else:
        if price is None:
            raise _error("50014", "Parameter px can not be empty.")
        if price <= 0 or price > MAX_PRICE:
            raise _error("51000", "Parameter px error")
        if price % market.tick:
            raise _error("51000", "Parameter px error")
    if amount is not None and amount < minimum:
        raise _error("51020", _BELOW_MIN_SIZE)
    return OrderRequest(
        market=market,
        side=side,
        type=core_type,  # type: ignore[arg-type]
        amount=amount,
        quote_amount=quote_amount,
        price=price,
        time_in_force=tif,  # type: ignore[arg-type]
    )


def _order_details(o: Order, m: Market) -> dict[str, Any]:
    """ "Get order details": OKX's order, with the last fill's figures and the fee as a negative number."""
    last = o.fills[-1] if o.fills else None
    tif = o.time_in_force if o.type == "limit" else ("GTC" if o.type == "limit_maker" else "")
    average = o.cost / o.filled if o.filled else None
    return {
        "instType": "SPOT",
        "instId": m.id,
        "tgtCcy": "quote_ccy" if o.quote_amount else "base_ccy" if o.type == "market" else "",
        "ccy": "",
        "ordId": str(o.order_id),
        "clOrdId": o.client_order_id if not o.client_order_id.startswith("emu") else "",
        "tag": "",
        "px": _fmt(o.price) if o.type != "market" else "",
        "pxUsd": "",
        "pxVol": "",
        "pxType": "",
        "sz": _fmt(o.quote_amount if o.quote_amount else o.amount),
        "pnl": "0",
        "ordType": _OKX_TYPE.get((o.type, tif), "limit"),
        "side": o.side,
        "posSide": "net",
        "tdMode": "cash",
        "accFillSz": _fmt(o.filled),
        "fillPx": _fmt(last.price) if last else "",
        "tradeId": str(last.id) if last else "",
        "fillSz": _fmt(last.qty) if last else "0",
        "fillTime": str(last.time) if last else "",
        "avgPx": _fmt(average) if average is not None else "",
        "state": _STATE[o.status],
        "stpId": "",
        "stpMode": "cancel_maker",
        "lever": "",
        "attachAlgoClOrdId": "",
        "tpTriggerPx": "",
        "tpTriggerPxType": "",
        "tpOrdPx": "",
        "slTriggerPx": "",
        "slTriggerPxType": "",
        "slOrdPx": "",
        "attachAlgoOrds": [],
        "linkedAlgoOrd": {"algoId": ""},
        "feeCcy": (o.fills[0].commission_asset if o.fills else (m.base if o.side == "buy" else m.quote)),
        "fee": _fmt(-o.fee_total),
        "rebateCcy": m.quote if o.side == "buy" else m.base,
        "rebate": "0",
        "source": "",
        "category": "normal",
        "reduceOnly": "false",
        "isTpLimit": "false",
        "cancelSource": "",
        "cancelSourceReason": "",
        "quickMgnType": "",
        "algoClOrdId": "",
        "algoId": "",
        "uTime": str(o.update_time),
        "cTime": str(o.time),
    }


def okx_client(base_url: str, credentials: Mapping[str, str] | None = None, **options: Any) -> Any:
    """A real `ccxt.okx` pointed at `base_url`, for tests (only scheme and host of its URL change)."""
    return OkxDialect().client(base_url, credentials, **options)
