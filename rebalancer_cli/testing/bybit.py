"""Bybit API v5 (spot, Unified Trading Account), the dialect the real `ccxt.bybit` client talks to over HTTP.

The core (`core.py`) keeps balances, books, matching, fees, faults and counts; this module is what is
Bybit's, after the published v5 docs (https://bybit-exchange.github.io/docs/v5/, sections named below):

* Signatures (v5 "Integration Guidance" / intro): headers `X-BAPI-API-KEY`, `X-BAPI-TIMESTAMP` (ms),
  `X-BAPI-RECV-WINDOW` (default 5000) and `X-BAPI-SIGN` = hex HMAC-SHA256 of
  `timestamp + apiKey + recvWindow + (queryString | rawJsonBody)`. A request is honoured only while
  `server_time - recv_window <= timestamp < server_time + 1000`; outside it retCode 10002. A wrong key
  is 10003 "API key is invalid.", a wrong signature 10004 "error sign! ...".
* Envelopes: every answer is HTTP 200 `{"retCode", "retMsg", "result", "retExtInfo", "time"}`, retCode 0
  on success; refusals keep HTTP 200 and carry their code (v5 "Error Codes", Spot Trade table: 170121
  invalid symbol, 170131 insufficient balance, 170134 price decimals, 170136 / 170137 quantity too small /
  too many decimals, 170140 order value below the minimum, 170141 "Duplicate clientOrderId", 170213 order
  does not exist). Only a missing key (401), an unknown path (404), the IP limit (403) and a gateway's
  5xx change the HTTP status.
* Rate limits (v5 "Rate Limit"): in a rolling one-second window; past it retCode 10006 "Too many visits!"
  with `X-Bapi-Limit`, `X-Bapi-Limit-Status` and `X-Bapi-Limit-Reset-Timestamp` (ms); Bybit sends no
  `Retry-After`. One budget of 50 requests a second stands for the IP's limit and the per-UID ones (see
  `WEIGHT_LIMIT`). A client that keeps sending while refused is shut out with
  HTTP 403, Bybit's IP ban, which says nothing of its length.
* Markets (v5 "Get Instruments Info", category=spot): `lotSizeFilter.basePrecision` (the quantity step,
  the snapshot's `amount_step`), `minOrderQty` (= the step), `minOrderAmt` (the snapshot's
  `min_notional`), `priceFilter.tickSize` (derived from the book's prices, at most 0.01).
* Orders (v5 "Place Order"): `category=spot`, `side` Buy/Sell, `orderType` Limit/Market, `qty`, `price`,
  `timeInForce` GTC/IOC/FOK/PostOnly, `orderLinkId` ("a max of 36 characters; numbers, letters, dashes,
  and underscores"). The answer is only `{orderId, orderLinkId}`: status and fills are read with
  `GET /v5/order/realtime` ("open orders, and the most recent 500 closed ones" of a UTA account, also
  by `orderLinkId`) or `GET /v5/order/history` (7 days, all statuses), executions with
  `GET /v5/execution/list`. An IOC limit fills what crosses and is closed as `Filled`,
  `PartiallyFilledCanceled` (a spot-only status) or `Cancelled`. A spot market Buy is sized in the quote
  coin unless `marketUnit=baseCoin` (UTA).
* Duplicate ids: the docs ask an `orderLinkId` to be "unique" without saying for how long. The emulator
  follows the core's scope (default "open": an id is refused with 170141 only while an order holding it is
  open), the most permissive reading: a filled IOC order does not protect its id, so a blind resend would
  trade twice and the idempotency tests would see it.
* Fees (v5 "Get Fee Rate", category=spot&symbol=...): the market's taker fee; spot fees are charged in the
  coin received (a buy pays in the base coin, a sell in the quote coin), as `execFee` per execution and
  `cumFeeDetail` per order.
* Balances (v5 "Get Wallet Balance", accountType=UNIFIED): coins with a non-zero balance only, each with
  `walletBalance` and `locked` (held by open orders); `availableToWithdraw` is returned empty, as Bybit
  deprecated it for UTA accounts, so ccxt computes free = walletBalance - locked.
* Account mode (v5 "Get API Key Information" `uta`: 1, "Get Account Info" `unifiedMarginStatus`: 5, UTA 2.0):
  ccxt asks both before its first balance or order call.

What the real ccxt 4.5 client raises for each answer (asserted in tests/test_emulator_bybit.py):

=====================================================  ===========================================
Bybit answer                                            ccxt exception class
=====================================================  ===========================================
10006 "Too many visits!" (rate limit)                   RateLimitExceeded
HTTP 403 (IP banned)                                    RateLimitExceeded (ccxt's bybit maps 403 so)
HTTP 500 / 502 / 503 (not JSON)                         ExchangeNotAvailable
HTTP 5xx, 10016 "Internal System Error."                ExchangeError (NOT a NetworkError: the profile
                                                        classifies 10016 as transient)
170007 "Timeout waiting for response from backend"      RequestTimeout (order status unknown)
10002 (outside the receive window)                      InvalidNonce
10003 / 10004 (key / signature)                         AuthenticationError
10005 (permission denied)                               PermissionDenied
170131 (insufficient balance)                           InsufficientFunds
170134 / 170136 / 170137 / 170140 (filters)             InvalidOrder
170141 "Duplicate clientOrderId."                       InvalidOrder
170121 "Invalid symbol."                                InvalidOrder
170213 "Order does not exist." (cancel)                 OrderNotFound
170130 (a parameter not valid: a bad orderLinkId)       BadRequest
10001 (parameter error)                                 BadRequest
=====================================================  ===========================================

Bybit creates orders asynchronously: `visible_after_ms` hides an accepted order from the order lists for a
while after its ack (0 by default, so the contract suite runs without it; tests/test_profile_bybit.py
proves the profile waits for it). Not modelled, so not proven: the spot price band (`riskParameters`,
170193 / 170194 for a limit too far from the market); the per-endpoint limits one by one; paging
(`nextPageCursor` is always empty: one page holds everything); classic (non-UTA) accounts. The code for an
orderLinkId outside the rules (170130) is our reading of the Spot Trade table, which names no code for it;
some UTA answers carry 12141 for a duplicate, which the profile knows too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from rebalancer_cli.testing.core import (
    DAY_MS,
    DEFAULT_API_KEY,
    DEFAULT_SECRET,
    MAX_NOTIONAL,
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
    Trade,
    const,
    now_ms,
    plain,
)

DEFAULT_RECV_WINDOW_MS = 5000
# v5 "Rate Limit": limits are per second, in a rolling window. Public and most private reads have no per-UID
# limit, only the IP's (GET: 50 requests a second); orders are limited to 20 a second, the fee rate to 10, the
# coin info to 2. One budget of 50 requests a second, every request weighing 1, stands for them all (the
# per-endpoint limits are not modelled one by one); ccxt's own pacing for Bybit (10 reads a second) stays
# inside it.
WEIGHT_LIMIT = 50
WEIGHT_WINDOW = 1.0
REALTIME_CLOSED_KEPT = 500  # "the most recent 500 closed status orders" (Get Open & Closed Orders)
HISTORY_MS = 7 * DAY_MS  # "If not passed, query the past 7 days data by default" (Get Order History)
BOOK_MAX_LEVELS = 200  # spot: [1, 200], default 1 (Get Orderbook)

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,36}$")
_DECIMAL_RE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,20})?$")
_QUOTE_PRECISION = Decimal("0.00000001")

_INTERVAL_MS: dict[str, int] = {
    "1": 60_000,
    "3": 180_000,
    "5": 300_000,
    "15": 900_000,
    "30": 1_800_000,
    "60": 3_600_000,
    "120": 7_200_000,
    "240": 14_400_000,
    "360": 21_600_000,
    "720": 43_200_000,
    "D": DAY_MS,
    "W": 7 * DAY_MS,
}
# Bybit's weekly candles open on Monday 00:00 UTC; the Unix epoch was a Thursday.
_INTERVAL_OFFSET_MS: dict[str, int] = {"W": 4 * DAY_MS}

_AUTH_MESSAGES: dict[int, str] = {
    10003: "API key is invalid.",
    10004: "error sign! please check your signature generation algorithm.",
    10005: "Permission denied, please check your API key permissions.",
    10010: "Unmatched IP, please check your API key's bound IP addresses.",
}
_STATUS_OPEN = {"open": "New", "partially_filled": "PartiallyFilled", "filled": "Filled"}
_SIDES = {"Buy": "buy", "Sell": "sell"}


def _envelope(result: Any, code: int = 0, msg: str = "OK") -> dict[str, Any]:
    return {"retCode": code, "retMsg": msg, "result": result, "retExtInfo": {}, "time": now_ms()}


def _error(code: int, msg: str, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> ApiError:
    """A Bybit refusal: HTTP 200 (unless `status` says otherwise) with the retCode ccxt maps to its classes."""
    return ApiError(status, _envelope({}, code, msg), headers)


def _params_error(detail: str) -> ApiError:
    return _error(10001, f"params error: {detail}")


def _empty(name: str) -> ApiError:
    return _error(170105, f"Parameter '{name}' was empty.")


def _invalid(name: str) -> ApiError:
    return _error(170130, f"Data sent for paramter '{name}' is not valid.")


def _decimal(params: Mapping[str, Any], name: str) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _DECIMAL_RE.match(str(raw)):
        raise _invalid(name)
    return Decimal(str(raw))


def _int(params: Mapping[str, Any], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not str(raw).isdigit():
        raise _params_error(f"{name} invalid")
    return int(str(raw))


def _decimals_of(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _is_multiple(value: Decimal, step: Decimal) -> bool:
    return value % step == 0


class BybitDialect(Dialect):
    name = "bybit"
    ccxt_id = "bybit"
    credentials: ClassVar[dict[str, str]] = {"apiKey": DEFAULT_API_KEY, "secret": DEFAULT_SECRET}
    order_path = "/v5/order/create"
    budgets = (Budget("api", header="X-Bapi-Limit-Status", header_shows="remaining"),)
    weight_limit = WEIGHT_LIMIT
    weight_window = WEIGHT_WINDOW
    retry_after_header = False  # the wait is told in X-Bapi-Limit-Reset-Timestamp
    fee_in = "received"
    fee_decimals = 8
    client_id_pattern = _CLIENT_ID_RE
    auth_codes = tuple(_AUTH_MESSAGES)
    default_auth_code = 10003
    ccxt_options: ClassVar[dict[str, Any]] = {
        "fetchMarkets": {"types": ["spot"]},
        "defaultType": "spot",
        "adjustForTimeDifference": False,
    }
    # a short X-BAPI-RECV-WINDOW keeps the settle waits of recovery in tests short (ccxt sends its option)
    config_options: ClassVar[dict[str, Any]] = {"recvWindow": 1000}
    # Bybit creates orders asynchronously ("the ack ... indicates that the request is successfully accepted",
    # Place Order): an accepted order shows in the order lists only this many ms after its ack (0: at once)
    visible_after_ms: int = 0

    def routes(self) -> Mapping[tuple[str, str], Route]:
        read = const(1)  # every request weighs 1 (see WEIGHT_LIMIT)
        return {
            ("GET", "/v5/market/time"): Route(self._time, read),
            ("GET", "/v5/market/instruments-info"): Route(self._instruments, read, name="markets"),
            ("GET", "/v5/market/tickers"): Route(self._tickers, read, name="tickers"),
            ("GET", "/v5/market/orderbook"): Route(self._orderbook, read, name="book"),
            ("GET", "/v5/market/kline"): Route(self._kline, read, name="candles"),
            ("GET", "/v5/asset/coin/query-info"): Route(self._coin_info, read, signed=True),
            ("GET", "/v5/user/query-api"): Route(self._query_api, read, signed=True),
            ("GET", "/v5/account/info"): Route(self._account_info, read, signed=True),
            ("GET", "/v5/account/wallet-balance"): Route(self._wallet_balance, read, signed=True, name="balance"),
            ("GET", "/v5/account/fee-rate"): Route(self._fee_rate, read, signed=True, name="fees"),
            ("POST", "/v5/order/create"): Route(
                self._create, read, signed=True, places_order=True, name="create_order"
            ),
            ("POST", "/v5/order/cancel"): Route(self._cancel, read, signed=True, name="cancel_order"),
            ("GET", "/v5/order/realtime"): Route(self._realtime, read, signed=True, name="fetch_order"),
            ("GET", "/v5/order/history"): Route(self._history, read, signed=True, name="fetch_order_history"),
            ("GET", "/v5/execution/list"): Route(self._executions, read, signed=True, name="trades"),
        }

    def market_id(self, base: str, quote: str) -> str:
        return f"{base}{quote}"

    # --- answers the core asks for ---------------------------------------------------------------

    def authenticate(self, request: Request) -> None:
        """v5 intro, "Parameters for Authenticated Endpoints" and "Create A Request"."""
        emulator = self.emulator
        api_key = request.header("X-BAPI-API-KEY")
        if not api_key:
            raise ApiError(401, "401 Unauthorized: authentication parameters belong in the request headers")
        if not hmac.compare_digest(api_key.encode(), emulator.api_key.encode()):
            raise _error(10003, _AUTH_MESSAGES[10003])
        raw_stamp = request.header("X-BAPI-TIMESTAMP") or ""
        raw_window = request.header("X-BAPI-RECV-WINDOW") or str(DEFAULT_RECV_WINDOW_MS)
        if not raw_stamp.isdigit() or not raw_window.isdigit():
            raise _params_error("timestamp or recv_window is not an integer")
        stamp, window, now = int(raw_stamp), int(raw_window), now_ms()
        if not now - window <= stamp < now + 1000:
            raise _error(
                10002,
                "invalid request, please check your server timestamp or recv_window param. "
                f"req_timestamp[{stamp}],server_timestamp[{now}],recv_window[{window}]",
            )
        signed = request.body if request.method == "POST" else request.query
        origin = f"{raw_stamp}{api_key}{raw_window}{signed}"
        expected = hmac.new(emulator.secret.encode(), origin.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, (request.header("X-BAPI-SIGN") or "").lower()):
            raise _error(10004, f"error sign! origin_string[{origin}]")

    def auth_refusal(self, code: int | str) -> ApiError:
        return _error(int(code), _AUTH_MESSAGES[int(code)])

    def render_rejection(self, rejection: Rejection) -> ApiError:
        reason, detail = rejection.reason, rejection.detail
        if reason == "filter":
            if detail == "NOTIONAL":
                return _error(170140, "Order value exceeded lower limit.")
            if detail == "PRICE_FILTER":
                return _error(170134, "Order price decimal too long.")
            return _error(170137, "Order volume decimal too long.")
        if reason == "duplicate_client_id":
            return _error(170141, "Duplicate clientOrderId.")
        if reason == "insufficient_funds":
            return _error(170131, "Insufficient balance.")
        if reason == "would_take":
            return _error(170218, "The LIMIT-MAKER order is rejected due to invalid price.")
        if reason == "unknown_market":
            return _error(170121, "Invalid symbol.")
        return _error(170213, "Order does not exist.")

    def rate_limited(self, limit: int, used: int, retry_after: int) -> ApiError:
        return _error(10006, "Too many visits!", headers=self._limit_headers(limit, retry_after))

    def banned(self, limit: int, used: int, retry_after: int, until_ms: int) -> ApiError:
        """v5 "Rate Limit": "If you receive an HTTP 403 (Access Denied) response, your IP has been banned"."""
        return ApiError(403, "403 Forbidden: access too frequent")  # Bybit does not say for how long

    def unknown_route(self, method: str, path: str) -> ApiError:
        return _error(10017, f"Route not found: {method} {path}", status=404)

    def unknown_status(self) -> ApiError:
        return _error(170007, "Timeout waiting for response from backend server.")

    def internal_error(self, status: int) -> ApiError:
        """v5 "Error Codes": 10016 "Internal System Error." (also "service is restarting")."""
        return _error(10016, "Internal System Error.", status=status)

    def _limit_headers(self, limit: int, retry_after: int) -> tuple[tuple[str, str], ...]:
        return (
            ("X-Bapi-Limit", str(limit)),
            ("X-Bapi-Limit-Reset-Timestamp", str(now_ms() + retry_after * 1000)),
        )

    def extra_headers(self, route: Route, now: float) -> list[tuple[str, str]]:
        """v5 "Rate Limit": the limit, and (when not exceeded) the current time as the reset timestamp."""
        return [("X-Bapi-Limit", str(self.emulator.budget_limit())), ("X-Bapi-Limit-Reset-Timestamp", str(now_ms()))]

    # --- market data -----------------------------------------------------------------------------

    def _spot(self, params: Mapping[str, Any], *, required: bool = True) -> None:
        category = params.get("category")
        if not category:
            if required:
                raise _params_error("category is required")
            return
        if category != "spot":
            raise _params_error(f"category {category} is not served by this emulator (spot only)")

    def _market(self, params: Mapping[str, Any], *, code: int = 10001) -> Market:
        symbol = params.get("symbol")
        if not symbol:
            raise _params_error("symbol is required") if code == 10001 else _empty("symbol")
        market = self.emulator.markets.get(str(symbol))
        if market is None:
            raise _error(10001, "Not supported symbols") if code == 10001 else _error(170121, "Invalid symbol.")
        return market

    def _markets(self, params: Mapping[str, Any]) -> list[Market]:
        if params.get("symbol"):
            return [self._market(params)]
        return list(self.emulator.markets.values())

    def _time(self, req: Request) -> Any:
        now = now_ms()
        return _envelope({"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)})

    def _instruments(self, req: Request) -> Any:
        self._spot(req.params)
        return _envelope(
            {"category": "spot", "list": [_instrument(m) for m in self._markets(req.params)], "nextPageCursor": ""}
        )

    def _tickers(self, req: Request) -> Any:
        self._spot(req.params)
        return _envelope({"category": "spot", "list": [_ticker(m) for m in self._markets(req.params)]})

    def _orderbook(self, req: Request) -> Any:
        self._spot(req.params)
        market = self._market(req.params)
        limit = _int(req.params, "limit") or 1
        if not 1 <= limit <= BOOK_MAX_LEVELS:
            raise _params_error(f"limit must be in [1, {BOOK_MAX_LEVELS}]")
        now = now_ms()
        return _envelope(
            {
                "s": market.id,
                "b": [[plain(p), plain(a)] for p, a in market.bids[:limit]],
                "a": [[plain(p), plain(a)] for p, a in market.asks[:limit]],
                "ts": now,
                "u": self.emulator.update_id,
                "seq": self.emulator.update_id,
                "cts": now,
            }
        )

    def _kline(self, req: Request) -> Any:
        self._spot(req.params, required=False)
        market = self._market(req.params)
        interval = str(req.params.get("interval") or "")
        if interval not in _INTERVAL_MS:
            raise _params_error("interval invalid")
        limit = _int(req.params, "limit") or 200
        if not 1 <= limit <= 1000:
            raise _params_error("limit must be in [1, 1000]")
        step = _INTERVAL_MS[interval]
        candles = self.emulator.candles(
            market,
            interval,
            step,
            limit,
            _int(req.params, "start"),
            _int(req.params, "end"),
            offset_ms=_INTERVAL_OFFSET_MS.get(interval, 0),
        )
        rows = [
            [
                str(c.open_ms),
                plain(c.open),
                plain(c.high),
                plain(c.low),
                plain(c.close),
                plain(c.volume),
                plain((c.volume * c.close).quantize(_QUOTE_PRECISION)),
            ]
            for c in reversed(candles)  # newest first, as Bybit lists them
        ]
        return _envelope({"category": "spot", "symbol": market.id, "list": rows})

    # --- account ---------------------------------------------------------------------------------

    def _coin_info(self, req: Request) -> Any:
        coins = sorted({a for m in self.emulator.markets.values() for a in (m.base, m.quote)})
        rows = [{"name": c, "coin": c, "remainAmount": "0", "chains": []} for c in coins]
        return _envelope({"rows": rows})

    def _query_api(self, req: Request) -> Any:
        return _envelope(
            {
                "id": "1",
                "note": "emulator",
                "apiKey": self.emulator.api_key,
                "readOnly": 0,
                "secret": "",
                "permissions": {"Spot": ["SpotTrade"], "Wallet": ["AccountTransfer"]},
                "ips": ["*"],
                "type": 1,
                "deadlineDay": 90,
                "unified": 0,
                "uta": 1,
                "userID": 1,
                "inviterID": 0,
                "vipLevel": "No VIP",
                "mktMakerLevel": "0",
                "affiliateID": 0,
                "rsaPublicKey": "",
                "isMaster": True,
                "parentUid": "0",
            }
        )

    def _account_info(self, req: Request) -> Any:
        return _envelope(
            {
                "unifiedMarginStatus": 5,  # UTA 2.0
                "marginMode": "REGULAR_MARGIN",
                "isMasterTrader": False,
                "spotHedgingStatus": "OFF",
                "updatedTime": str(self.emulator.balance_update_ms),
                "dcpStatus": "OFF",
                "timeWindow": 10,
                "smpGroup": 0,
            }
        )

    def _wallet_balance(self, req: Request) -> Any:
        account_type = req.params.get("accountType")
        if not account_type:
            raise _params_error("accountType is required")
        if account_type != "UNIFIED":
            raise _params_error(f"accountType {account_type} is not supported by a UTA 2.0 account")
        wanted = {c for c in str(req.params.get("coin") or "").split(",") if c}
        coins = []
        for asset, b in self.emulator.balances.items():
            total = b.free + b.locked
            if (wanted and asset not in wanted) or (not wanted and total == 0):
                continue
            coins.append(
                {
                    "coin": asset,
                    "equity": plain(total),
                    "usdValue": "",
                    "walletBalance": plain(total),
                    "locked": plain(b.locked),
                    "spotHedgingQty": "0",
                    "borrowAmount": "0",
                    "availableToWithdraw": "",  # deprecated for UTA accounts: returned empty
                    "accruedInterest": "0",
                    "totalOrderIM": "0",
                    "totalPositionIM": "0",
                    "totalPositionMM": "0",
                    "unrealisedPnl": "0",
                    "cumRealisedPnl": "0",
                    "bonus": "0",
                    "marginCollateral": True,
                    "collateralSwitch": True,
                    "spotBorrow": "0",
                }
            )
        account = {
            "accountType": "UNIFIED",
            "accountIMRate": "0",
            "accountMMRate": "0",
            "accountLTV": "0",
            "totalEquity": "",
            "totalWalletBalance": "",
            "totalMarginBalance": "",
            "totalAvailableBalance": "",
            "totalPerpUPL": "0",
            "totalInitialMargin": "0",
            "totalMaintenanceMargin": "0",
            "coin": coins,
        }
        return _envelope({"list": [account]})

    def _fee_rate(self, req: Request) -> Any:
        self._spot(req.params)
        rows = [
            {"symbol": m.id, "baseCoin": "", "takerFeeRate": plain(m.taker_fee), "makerFeeRate": plain(m.taker_fee)}
            for m in self._markets(req.params)
        ]
        return _envelope({"list": rows})

    # --- orders ----------------------------------------------------------------------------------

    def _create(self, req: Request) -> Any:
        """v5 "Place Order": Bybit's parameter checks here, the market's in `_order_request` and the core."""
        params = req.params
        self._spot(params)
        market = self._market(params, code=170121)
        client_id = params.get("orderLinkId")
        client_id = str(client_id) if client_id not in (None, "") else self.emulator.generated_client_id()
        if not _CLIENT_ID_RE.match(client_id):
            raise _invalid("orderLinkId")
        order = self.emulator.submit(client_id, lambda: _order_request(market, params))
        assert order is not None
        return _envelope({"orderId": str(order.order_id), "orderLinkId": order.client_order_id})

    def _find(self, params: Mapping[str, Any], market: Market | None) -> list[Order]:
        """The orders a query names, newest first: by `orderId` (priority) or `orderLinkId`, else all."""
        raw_id = params.get("orderId")
        link_id = params.get("orderLinkId")
        orders = [o for o in reversed(self.emulator.orders.values()) if market is None or o.market_id == market.id]
        if raw_id:
            return [o for o in orders if str(o.order_id) == str(raw_id)]
        if link_id:
            return [o for o in orders if o.client_order_id == str(link_id)]
        return orders

    def _cancel(self, req: Request) -> Any:
        params = req.params
        self._spot(params)
        market = self._market(params, code=170121)
        if not params.get("orderId") and not params.get("orderLinkId"):
            raise _params_error("orderId or orderLinkId is required")
        found = self._find(params, market)
        if not found or not found[0].is_open:
            raise _error(170213, "Order does not exist.")
        order = found[0]
        self.emulator.cancel(order)
        return _envelope({"orderId": str(order.order_id), "orderLinkId": order.client_order_id})

    def _query(self, req: Request, *, realtime: bool) -> list[Order]:
        params = req.params
        self._spot(params)
        market = self._market(params) if params.get("symbol") else None
        limit = _int(params, "limit") or 20
        if not 1 <= limit <= 50:
            raise _params_error("limit must be in [1, 50]")
        orders = self._find(params, market)
        if self.visible_after_ms:
            shown_until = now_ms() - self.visible_after_ms
            orders = [o for o in orders if o.time <= shown_until]
        by_id = bool(params.get("orderId") or params.get("orderLinkId"))
        if realtime:
            closed = [o.order_id for o in reversed(self.emulator.orders.values()) if not o.is_open]
            kept = set(closed[:REALTIME_CLOSED_KEPT])
            open_only = str(params.get("openOnly") or "0") == "0"
            orders = [o for o in orders if o.is_open or (o.order_id in kept and (by_id or not open_only))]
        else:
            start, end = _int(params, "startTime"), _int(params, "endTime")
            end = end if end is not None else now_ms()
            start = start if start is not None else end - HISTORY_MS
            orders = [o for o in orders if start <= o.time <= end]
        return orders[:limit]

    def _realtime(self, req: Request) -> Any:
        orders = self._query(req, realtime=True)
        return _envelope({"category": "spot", "list": [self._order(o) for o in orders], "nextPageCursor": ""})

    def _history(self, req: Request) -> Any:
        orders = self._query(req, realtime=False)
        return _envelope({"category": "spot", "list": [self._order(o) for o in orders], "nextPageCursor": ""})

    def _executions(self, req: Request) -> Any:
        params = req.params
        self._spot(params)
        market = self._market(params) if params.get("symbol") else None
        exec_type = params.get("execType")
        if exec_type not in (None, "", "Trade"):
            return _envelope({"category": "spot", "list": [], "nextPageCursor": ""})
        limit = _int(params, "limit") or 50
        if not 1 <= limit <= 100:
            raise _params_error("limit must be in [1, 100]")
        orders = {o.order_id: o for o in self.emulator.orders.values()}
        trades = [t for t in reversed(self.emulator.trades) if market is None or t.market_id == market.id]
        if params.get("orderId"):
            trades = [t for t in trades if str(t.order_id) == str(params["orderId"])]
        if params.get("orderLinkId"):
            trades = [t for t in trades if orders[t.order_id].client_order_id == str(params["orderLinkId"])]
        start, end = _int(params, "startTime"), _int(params, "endTime")
        end = end if end is not None else now_ms()
        start = start if start is not None else end - HISTORY_MS
        rows = [self._execution(t, orders[t.order_id]) for t in trades if start <= t.time <= end]
        return _envelope({"category": "spot", "list": rows[:limit], "nextPageCursor": ""})

    # --- shapes ----------------------------------------------------------------------------------

    def _order(self, o: Order) -> dict[str, Any]:
        """One order as "Get Open & Closed Orders" lists it (UTA spot)."""
        market = self.emulator.markets[o.market_id]
        # closed without filling everything: canceled by the user, or the rest of an IOC / FOK / market order
        status = _STATUS_OPEN.get(o.status, "PartiallyFilledCanceled" if o.filled else "Cancelled")
        fee_coin = o.fills[0].commission_asset if o.fills else ""
        leaves = o.amount - o.filled if o.is_open else Decimal(0)
        price = o.price if o.type != "market" else Decimal(0)
        return {
            "orderId": str(o.order_id),
            "orderLinkId": o.client_order_id,
            "blockTradeId": "",
            "symbol": market.id,
            "price": plain(price),
            "qty": plain(o.quote_amount if o.quote_amount else o.amount),
            "side": "Buy" if o.side == "buy" else "Sell",
            "isLeverage": "0",
            "positionIdx": 0,
            "orderStatus": status,
            "cancelType": "CancelByUser" if o.status == "canceled" else "UNKNOWN",
            "rejectReason": "EC_NoError" if o.status != "expired" or o.filled else "EC_NoImmediateQtyToFill",
            "avgPrice": plain(o.cost / o.filled) if o.filled else "",
            "leavesQty": plain(leaves),
            "leavesValue": plain(leaves * price),
            "cumExecQty": plain(o.filled),
            "cumExecValue": plain(o.cost),
            "cumExecFee": plain(o.fee_total),
            "cumFeeDetail": {fee_coin: plain(o.fee_total)} if fee_coin else {},
            "timeInForce": "IOC" if o.type == "market" else o.time_in_force,
            "orderType": "Market" if o.type == "market" else "Limit",
            "stopOrderType": "",
            "orderIv": "",
            "marketUnit": ("quoteCoin" if o.quote_amount else "baseCoin") if o.type == "market" else "",
            "triggerPrice": "0",
            "takeProfit": "0",
            "stopLoss": "0",
            "tpslMode": "",
            "ocoTriggerBy": "",
            "tpLimitPrice": "",
            "slLimitPrice": "",
            "tpTriggerBy": "",
            "slTriggerBy": "",
            "triggerDirection": 0,
            "triggerBy": "",
            "lastPriceOnCreated": "",
            "reduceOnly": False,
            "closeOnTrigger": False,
            "placeType": "",
            "smpType": "None",
            "smpGroup": 0,
            "smpOrderId": "",
            "createdTime": str(o.time),
            "updatedTime": str(o.update_time),
        }

    def _execution(self, t: Trade, o: Order) -> dict[str, Any]:
        """One fill as "Get Trade History" (execution list) lists it."""
        market = self.emulator.markets[t.market_id]
        return {
            "symbol": market.id,
            "orderId": str(o.order_id),
            "orderLinkId": o.client_order_id,
            "side": "Buy" if t.is_buyer else "Sell",
            "orderPrice": plain(o.price),
            "orderQty": plain(o.amount),
            "leavesQty": plain(o.amount - o.filled if o.is_open else Decimal(0)),
            "orderType": "Market" if o.type == "market" else "Limit",
            "stopOrderType": "",
            "execFee": plain(t.commission),
            "feeCurrency": t.commission_asset,
            "execId": str(uuid.UUID(int=t.id)),
            "execPrice": plain(t.price),
            "execQty": plain(t.qty),
            "execType": "Trade",
            "execValue": plain(t.quote_qty),
            "execTime": str(t.time),
            "isMaker": t.is_maker,
            "feeRate": plain(market.taker_fee),
            "tradeIv": "",
            "markIv": "",
            "markPrice": plain(market.last()),
            "indexPrice": "",
            "underlyingPrice": "",
            "blockTradeId": "",
            "closedSize": "",
            "seq": t.id,
            "extraFees": "",
        }


def _order_request(market: Market, params: Mapping[str, Any]) -> OrderRequest:
    """Bybit's checks of a new spot order (v5 "Place Order", Spot Trade error codes), before the core's."""
    side = params.get("side")
    if not side:
        raise _empty("side")
    if side not in _SIDES:
        raise _error(170117, "Invalid side.")
    order_type = params.get("orderType")
    if not order_type:
        raise _empty("orderType")
    if order_type not in ("Limit", "Market"):
        raise _error(170116, "Invalid orderType.")
    order_filter = params.get("orderFilter") or "Order"
    if order_filter != "Order":
        raise _error(170202, "Invalid orderFilter parameter.")
    if str(params.get("isLeverage") or "0") != "0":
        raise _error(170036, "You haven't enabled Cross Margin Trading yet.")
    qty = _decimal(params, "qty")
    if qty is None:
        raise _empty("qty")
    tif = params.get("timeInForce") or "GTC"
    if tif not in ("GTC", "IOC", "FOK", "PostOnly"):
        raise _error(170115, "Invalid timeInForce.")
    lot = market.step
    if order_type == "Market":
        unit = params.get("marketUnit") or ("quoteCoin" if side == "Buy" else "baseCoin")
        if unit not in ("baseCoin", "quoteCoin"):
            raise _invalid("marketUnit")
        if unit == "quoteCoin":
            if _decimals_of(qty) > _decimals_of(_QUOTE_PRECISION):
                raise _error(170148, "Market order amount decimal too long.")
            if qty < market.min_notional:
                raise _error(170140, "Order value exceeded lower limit.")
            return OrderRequest(market=market, side=_SIDES[side], type="market", quote_amount=qty)  # type: ignore[arg-type]
        _check_quantity(qty, lot)
        return OrderRequest(market=market, side=_SIDES[side], type="market", amount=qty)  # type: ignore[arg-type]
    price = _decimal(params, "price")
    if price is None:
        raise _empty("price")
    if price <= 0:
        raise _error(170133, "Order price lower than the minimum.")
    if not _is_multiple(price, market.tick):
        raise _error(170134, "Order price decimal too long.")
    _check_quantity(qty, lot)
    if qty * price < market.min_notional:
        raise _error(170140, "Order value exceeded lower limit.")
    if qty * price > MAX_NOTIONAL:
        raise _error(170124, "Order amount too large.")
    return OrderRequest(
        market=market,
        side=_SIDES[side],  # type: ignore[arg-type]
        type="limit_maker" if tif == "PostOnly" else "limit",
        amount=qty,
        price=price,
        time_in_force="" if tif == "PostOnly" else tif,  # type: ignore[arg-type]
    )


def _check_quantity(qty: Decimal, lot: Decimal) -> None:
    if not _is_multiple(qty, lot):
        raise _error(170137, "Order volume decimal too long.")
    if qty < lot:
        raise _error(170136, "Order quantity lower than the minimum.")
    if qty > MAX_QTY:
        raise _error(170135, "Order quantity too large.")


def _instrument(m: Market) -> dict[str, Any]:
    """One spot market as "Get Instruments Info" describes it."""
    return {
        "symbol": m.id,
        "baseCoin": m.base,
        "quoteCoin": m.quote,
        "innovation": "0",
        "status": "Trading",
        "marginTrading": "none",
        "stTag": "0",
        "lotSizeFilter": {
            "basePrecision": plain(m.step),
            "quotePrecision": plain(_QUOTE_PRECISION),
            "minOrderQty": plain(m.step),
            "maxOrderQty": plain(MAX_QTY),
            "minOrderAmt": plain(m.min_notional),
            "maxOrderAmt": plain(MAX_NOTIONAL),
        },
        "priceFilter": {"tickSize": plain(m.tick)},
        "riskParameters": {"priceLimitRatioX": "0.05", "priceLimitRatioY": "0.05"},
    }


def _ticker(m: Market) -> dict[str, Any]:
    """One spot ticker as "Get Tickers" lists it: best bid/ask with sizes, 24 h statistics."""
    last = m.last()
    bid = m.bids[0] if m.bids else [Decimal(0), Decimal(0)]
    ask = m.asks[0] if m.asks else [Decimal(0), Decimal(0)]
    volume = m.book_volume()
    return {
        "symbol": m.id,
        "bid1Price": plain(bid[0]) if m.bids else "",
        "bid1Size": plain(bid[1]) if m.bids else "",
        "ask1Price": plain(ask[0]) if m.asks else "",
        "ask1Size": plain(ask[1]) if m.asks else "",
        "lastPrice": plain(last),
        "prevPrice24h": plain(last),
        "price24hPcnt": "0",
        "highPrice24h": plain(ask[0]) if m.asks else plain(last),
        "lowPrice24h": plain(bid[0]) if m.bids else plain(last),
        "turnover24h": plain((volume * last).quantize(_QUOTE_PRECISION)),
        "volume24h": plain(volume),
        "usdIndexPrice": "",
    }
