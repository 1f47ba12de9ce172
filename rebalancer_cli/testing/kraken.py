"""Kraken spot REST, the dialect the real `ccxt.kraken` client talks to over HTTP (hosted by `core.Emulator`).

The core keeps balances, books, matching, fees, faults and counts; this module is what is Kraken's, as
Kraken's REST reference (docs.kraken.com/api, "Spot REST") publishes it and as ccxt 4.5 drives it:

* Paths `/0/public/<Method>` (GET, query string) and `/0/private/<Method>` (POST, form body). Every answer
  is the envelope `{"error": [...], "result": {...}}` with HTTP 200; an error is the text in `error`
  ("EOrder:Insufficient funds"), which is all ccxt reads ("Spot Error Messages" guide).
* Authentication ("Spot REST Authentication"): `API-Key` header, `API-Sign` = base64(HMAC-SHA512(URI path
  + SHA256(nonce + POST body), base64-decoded secret)), a `nonce` in the body that must exceed the last
  one accepted for the key (no nonce window: the account setting is off by default). Refusals:
  EAPI:Invalid key, EAPI:Invalid signature, EAPI:Invalid nonce.
* Request validity: Kraken has no receive window; instead `AddOrder` takes `deadline`, "RFC3339 timestamp
  after which the matching engine should reject the new order request, in presence of latency or order
  queueing. min now() + 2 seconds, max now() + 60 seconds" ("Add Order"). A request that reaches the
  engine (after any latency the core injects) past its deadline is refused with EService:Deadline elapsed
  and counted as rejected; a deadline more than 60 s ahead is EGeneral:Invalid arguments:deadline.
  Without `deadline` an order is accepted however late it arrives: a client must set one to bound how
  long a sent order can still trade.
* Assets and pairs ("Get Asset Info", "Get Tradable Asset Pairs"): legacy asset ids (XXBT/XBT, XETH,
  ZUSD, ZEUR, ...) and pair ids (XXBTZUSD when both assets are legacy, else altnames: XBTUSDC, SOLUSD);
  `lot_decimals` (the snapshot's `amount_step`, which must be a power of ten), `pair_decimals` and
  `tick_size` (the book's tick), `ordermin` (one lot), `costmin` (the snapshot's `min_notional`), the
  taker fee as the only tier of `fees` (in percent) and `status` "online". `pair` accepts id or altname.
* Market data: Ticker (`a`/`b` = [price, whole lot volume, lot volume] of the top of book), Depth
  (`count` up to 500, levels [price, volume, timestamp]), OHLC (intervals in minutes, up to 720 rows of
  [time, open, high, low, close, vwap, volume, count], deterministic candles from the core).
* Account: Balance (totals) and BalanceEx (`balance` = total, `hold_trade` = locked), TradeVolume (the
  account's fee per pair, in percent).
* Orders ("Add Order"): `ordertype` limit or market, `type` buy/sell, `volume` in base units (viqc: in
  quote, market orders), `price` (limit), `timeinforce` GTC or IOC, `oflags` (fciq, nompp, viqc),
  `cl_ord_id` or `userref` (mutually exclusive), `validate`, `deadline`. Checks in Kraken's terms:
  EGeneral:Invalid arguments:<field>, EOrder:Order minimum not met (below `ordermin`), EOrder:Cost minimum
  not met (below `costmin`), EOrder:Invalid price:<pair> price can only be specified up to N decimals,
  EOrder:Insufficient funds. The answer is `{"descr": {"order": "buy 0.01000000 XBTUSDC @ limit
  65000.0"}, "txid": ["OXXXXX-XXXXX-XXXXXX"]}`: no status and no fill, so a client must look the order up.
  Fees are charged in the quote asset (`fciq`, what ccxt's trade parser assumes: it labels every trade fee
  with the pair's quote); `fcib` and `post` are refused as not modelled here.
* Client order ids ("Spot Client Order Identifiers"): `cl_ord_id` is a long UUID (36 characters with
  dashes), a short UUID (32 hex) or free text of at most 18 characters; anything else is
  EGeneral:Invalid arguments:cl_ord_id. Kraken "verifies cl_ord_id uniqueness across open orders for each
  client": a second order under the id of an OPEN order is refused (the text is not in Kraken's published
  error list; the emulator answers EOrder:Duplicate order, the wording client code in the wild matches),
  while the id of an order that filled or was cancelled may be used again, and that order trades again.
  An immediate-or-cancel order is never open after its answer, so its id gives no protection at all:
  idempotency on Kraken rests on looking the order up by `cl_ord_id` before any resend, and on `deadline`.
* Lookups: OpenOrders / ClosedOrders filter by `cl_ord_id` (or `userref`) and return `{txid: order}`
  maps (ClosedOrders newest first, 50 a page); QueryOrders needs `txid`; CancelOrder takes `txid` or
  `cl_ord_id` (EOrder:Unknown order when nothing open matches); TradesHistory and QueryTrades give fills.
  Order status words: open (also partly filled), closed (filled), canceled (cancelled, and an IOC order's
  unfilled rest).
* Rate limits ("Spot REST Rate Limits"): the private call counter (most calls 1, trade history 2; AddOrder
  and CancelOrder are outside it, on the trading engine's own limiter, counted but not enforced here) as a
  sliding 60 s budget (default 80: the Pro tier's 20 plus 1/s decay over a minute), public calls in their
  own budget (60 a minute, Kraken's roughly one per second per IP). Past a limit: EAPI:Rate limit exceeded
  (the core adds `Retry-After`); a client that keeps sending is locked out: EGeneral:Temporary lockout.

What the real ccxt 4.5 `kraken` client raises for each answer (asserted in tests/test_emulator_kraken.py;
the Kraken profile maps the ones ccxt leaves generic):

=====================================================  ===========================================
Kraken answer                                           ccxt exception class
=====================================================  ===========================================
EAPI:Invalid key                                        AuthenticationError
EAPI:Invalid signature                                  ExchangeError (ccxt does not map it)
EGeneral:Permission denied                              PermissionDenied
EAPI:Invalid nonce                                      InvalidNonce (a NetworkError)
EAPI:Rate limit exceeded / EGeneral:Temporary lockout   DDoSProtection
EGeneral:Internal error (status unknown)                ExchangeNotAvailable
EService:Deadline elapsed                               ExchangeError (not mapped)
EOrder:Insufficient funds                               InsufficientFunds
EOrder:Order minimum not met                            InvalidOrder
EOrder:Cost minimum not met                             ExchangeError (not mapped)
EOrder:Invalid price:...                                ExchangeError (not mapped)
EOrder:Tick size check failed                           ExchangeError (not mapped)
EOrder:Duplicate order                                  ExchangeError (not mapped)
EGeneral:Invalid arguments:volume                       InvalidOrder (broad ":Invalid arguments:volume")
EGeneral:Invalid arguments:<other field>                ExchangeError (only the bare text is BadRequest)
EOrder:Unknown order (CancelOrder)                      OrderNotFound (ccxt's cancel_order rewrites it)
EQuery:Unknown asset pair                               ExchangeError (ccxt maps "Invalid asset pair")
EService:Unavailable (5xx fault with body="exchange")   ExchangeNotAvailable
HTTP 5xx page (fault)                                   ExchangeNotAvailable (504: RequestTimeout)
=====================================================  ===========================================
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, ClassVar

from rebalancer_cli.testing.core import (
    DAY_MS,
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

# Kraken secrets are base64 (64 bytes); the key is opaque text.
DEFAULT_API_KEY = "emulator-kraken-key-0123456789abcdef0123456789abcdef0123456789abcdef0123"
DEFAULT_SECRET = base64.b64encode(b"emulator-kraken-secret-0123456789abcdef0123456789abcdef012345678").decode()
DEADLINE_MAX_SECONDS = 60.0
PRIVATE_LIMIT = 80
PUBLIC_LIMIT = 60
PAGE = 50

# Legacy asset ids and altnames ("Get Asset Info"; support article 360001206766, "XBT vs BTC"); every other
# asset is listed under its own code.
LEGACY_ASSETS: dict[str, tuple[str, str]] = {
    "BTC": ("XXBT", "XBT"),
    "ETH": ("XETH", "ETH"),
    "LTC": ("XLTC", "LTC"),
    "XRP": ("XXRP", "XRP"),
    "XLM": ("XXLM", "XLM"),
    "XMR": ("XXMR", "XMR"),
    "ZEC": ("XZEC", "ZEC"),
    "ETC": ("XETC", "ETC"),
    "DOGE": ("XXDG", "XDG"),
    "USD": ("ZUSD", "USD"),
    "EUR": ("ZEUR", "EUR"),
    "GBP": ("ZGBP", "GBP"),
    "CAD": ("ZCAD", "CAD"),
    "JPY": ("ZJPY", "JPY"),
    "AUD": ("ZAUD", "AUD"),
}
# OHLC `interval` (minutes) -> candle length
_INTERVALS = {1, 5, 15, 30, 60, 240, 1440, 10080, 21600}
_LONG_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SHORT_UUID = re.compile(r"^[0-9a-fA-F]{32}$")
_FREE_TEXT = re.compile(r"^[\x21-\x7e]{1,18}$")
_DECIMAL_RE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,20})?$")
_OFLAGS = {"fciq", "fcib", "nompp", "post", "viqc"}
_STATUS = {"open": "open", "partially_filled": "open", "filled": "closed", "canceled": "canceled"}
_AUTH = ("EAPI:Invalid key", "EAPI:Invalid signature", "EGeneral:Permission denied")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def valid_cl_ord_id(value: str) -> bool:
    """Kraken's three `cl_ord_id` formats: long UUID, short UUID (32 hex) or free text up to 18 characters."""
    return bool(_LONG_UUID.match(value) or _SHORT_UUID.match(value) or _FREE_TEXT.match(value))


def asset_id(code: str) -> str:
    return LEGACY_ASSETS.get(code, (code, code))[0]


def asset_altname(code: str) -> str:
    return LEGACY_ASSETS.get(code, (code, code))[1]


def pair_id(base: str, quote: str) -> str:
    """XXBTZUSD for two legacy assets, the altnames joined otherwise (XBTUSDC, SOLUSD), as Kraken lists them."""
    if base in LEGACY_ASSETS and quote in LEGACY_ASSETS:
        return asset_id(base) + asset_id(quote)
    return asset_altname(base) + asset_altname(quote)


def pair_altname(m: Market) -> str:
    return asset_altname(m.base) + asset_altname(m.quote)


def api_sign(secret: str, path: str, nonce: str, body: str) -> str:
    """API-Sign: base64(HMAC-SHA512(path + SHA256(nonce + body), base64-decoded secret))."""
    digest = hashlib.sha256((nonce + body).encode()).digest()
    mac = hmac.new(base64.b64decode(secret), path.encode() + digest, hashlib.sha512)
    return base64.b64encode(mac.digest()).decode()


def _err(message: str, status: int = 200) -> ApiError:
    return ApiError(status, {"error": [message], "result": {}})


def _invalid(field: str) -> ApiError:
    return _err(f"EGeneral:Invalid arguments:{field}")


def _decimals(step: Decimal, what: str) -> int:
    """The decimal places of a power-of-ten step (Kraken states lots and ticks as decimal places)."""
    exponent = step.normalize().as_tuple().exponent
    if not isinstance(exponent, int) or step.normalize() != Decimal(1).scaleb(exponent):
        raise ValueError(f"Kraken states the {what} in decimal places: {step} is not a power of ten")
    return max(0, -exponent)


def _places(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _fixed(value: Decimal, decimals: int) -> str:
    """`decimals` places as Kraken writes them; a finer value is written exactly rather than rounded."""
    if _places(value) > decimals:
        return plain(value)
    return f"{value:.{decimals}f}"


def _seconds(ms: int) -> float:
    return round(ms / 1000, 4)


def _flag(params: Mapping[str, Any], name: str) -> bool:
    return str(params.get(name, "")).lower() in ("true", "1")


def _ident(prefix: str, number: int) -> str:
    """A Kraken-shaped id (OQCLML-BW3P3-BUCMWZ), derived from the core's number so it is stable."""
    digest = hashlib.sha256(f"{prefix}{number}".encode()).digest()
    chars = "".join(_ALPHABET[b % 32] for b in digest[:16])
    return f"{prefix}{chars[:5]}-{chars[5:10]}-{chars[10:16]}"


class KrakenDialect(Dialect):
    name = "kraken"
    ccxt_id = "kraken"
    credentials: ClassVar[dict[str, str]] = {"apiKey": DEFAULT_API_KEY, "secret": DEFAULT_SECRET}
    order_path = "/0/private/AddOrder"
    budgets = (
        Budget("private"),
        Budget("public", limit=PUBLIC_LIMIT),
        Budget("trading", enforced=False),
    )
    weight_limit = PRIVATE_LIMIT
    weight_window = 60.0
    fee_in = "quote"
    fee_decimals = 8
    client_id_pattern = re.compile(f"{_LONG_UUID.pattern}|{_SHORT_UUID.pattern}|{_FREE_TEXT.pattern}")
    auth_codes = _AUTH
    default_auth_code = "EAPI:Invalid key"
    content_type = "application/json; charset=utf-8"
    # test configs: the shortest AddOrder deadline the Kraken profile sends (3 s), so recovery waits 4 s
    config_options: ClassVar[dict[str, Any]] = {"deadlineSeconds": 3}
    # test configs are a Pro-tier account, as the private budget here is: ccxt paces Kraken for the Starter
    # tier (rateLimit 1000 ms, a private call costing 3: 0.33 calls/s); Pro decays 1 call/s = 180 a minute
    config_exchange: ClassVar[dict[str, Any]] = {"rate_limit_per_minute": 180}

    def __init__(self) -> None:
        self._last_nonce = 0
        self._userrefs: dict[int, int] = {}  # order id -> userref
        # orders placed without a cl_ord_id (their core client id is generated); every other order, also one
        # placed through the core (`Emulator.rest_order`), carries its client id as its cl_ord_id
        self._anonymous: set[int] = set()

    def routes(self) -> Mapping[tuple[str, str], Route]:
        def public(handler: Callable[[Request], Any], name: str) -> Route:
            return Route(self._wrap(handler), const(1), budget="public", name=name)

        def private(handler: Callable[[Request], Any], name: str, weight: int = 1) -> Route:
            return Route(self._wrap(handler), const(weight), signed=True, budget="private", name=name)

        return {
            ("GET", "/0/public/Time"): public(self._time, "time"),
            ("GET", "/0/public/SystemStatus"): public(self._system_status, "status"),
            ("GET", "/0/public/Assets"): public(self._assets, "markets"),
            ("GET", "/0/public/AssetPairs"): public(self._asset_pairs, "markets"),
            ("GET", "/0/public/Ticker"): public(self._ticker, "tickers"),
            ("GET", "/0/public/Depth"): public(self._depth, "book"),
            ("GET", "/0/public/OHLC"): public(self._ohlc, "candles"),
            ("POST", "/0/private/Balance"): private(self._balance, "balance"),
            ("POST", "/0/private/BalanceEx"): private(self._balance_ex, "balance"),
            ("POST", "/0/private/TradeVolume"): private(self._trade_volume, "fees"),
            ("POST", "/0/private/OpenOrders"): private(self._open_orders, "fetch_order"),
            ("POST", "/0/private/ClosedOrders"): private(self._closed_orders, "fetch_order"),
            ("POST", "/0/private/QueryOrders"): private(self._query_orders, "fetch_order"),
            ("POST", "/0/private/TradesHistory"): private(self._trades_history, "trades", 2),
            ("POST", "/0/private/QueryTrades"): private(self._query_trades, "trades"),
            # AddOrder and CancelOrder are outside the REST counter, on the trading engine's own limiter
            ("POST", "/0/private/AddOrder"): Route(
                self._wrap(self._add_order),
                const(1),
                signed=True,
                budget="trading",
                places_order=True,
                name="create_order",
            ),
            ("POST", "/0/private/CancelOrder"): Route(
                self._wrap(self._cancel_order), const(1), signed=True, budget="trading", name="cancel_order"
            ),
        }

    def market_id(self, base: str, quote: str) -> str:
        return pair_id(base, quote)

    @staticmethod
    def _wrap(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Every successful answer in Kraken's envelope."""
        return lambda request: {"error": [], "result": handler(request)}

    # --- answers the core asks for ---------------------------------------------------------------

    def authenticate(self, request: Request) -> None:
        emulator = self.emulator
        api_key = request.header("API-Key")
        if not api_key or not hmac.compare_digest(api_key.encode(), emulator.api_key.encode()):
            raise _err("EAPI:Invalid key")
        nonce = str(request.params.get("nonce", ""))
        if not nonce.isdigit():
            raise _err("EAPI:Invalid nonce")
        expected = api_sign(emulator.secret, request.path, nonce, request.body)
        if not hmac.compare_digest(expected.encode(), (request.header("API-Sign") or "").encode()):
            raise _err("EAPI:Invalid signature")
        if int(nonce) <= self._last_nonce:
            raise _err("EAPI:Invalid nonce")
        self._last_nonce = int(nonce)

    def auth_refusal(self, code: int | str) -> ApiError:
        return _err(str(code))

    def render_rejection(self, rejection: Rejection) -> ApiError:
        reason = rejection.reason
        if reason == "filter":
            if rejection.detail == "NOTIONAL":
                return _err("EOrder:Cost minimum not met")
            if rejection.detail == "PRICE_FILTER":
                return _err("EOrder:Tick size check failed")
            return _err("EOrder:Order minimum not met")
        if reason == "duplicate_client_id":
            return _err("EOrder:Duplicate order")
        if reason == "insufficient_funds":
            return _err("EOrder:Insufficient funds")
        if reason == "unknown_market":
            return _err("EQuery:Unknown asset pair")
        if reason == "would_take":
            return _invalid("oflags")
        return _err("EOrder:Unknown order")

    def rate_limited(self, limit: int, used: int, retry_after: int) -> ApiError:
        return _err("EAPI:Rate limit exceeded")

    def banned(self, limit: int, used: int, retry_after: int, until_ms: int) -> ApiError:
        return _err("EGeneral:Temporary lockout")

    def unknown_route(self, method: str, path: str) -> ApiError:
        return _err("EGeneral:Unknown method", 404)

    def internal_error(self, status: int) -> ApiError:
        """A failure before anything ran: "EService:Unavailable", the matching engine or API is offline."""
        return _err("EService:Unavailable", status)

    def unknown_status(self) -> ApiError:
        """The engine took the order but the gateway lost track of it: Kraken's "internal error"."""
        return _err("EGeneral:Internal error")

    # --- helpers ---------------------------------------------------------------------------------

    def _pair(self, name: object) -> Market:
        if not name:
            raise _invalid("pair")
        for m in self.emulator.markets.values():
            if name in (m.id, pair_altname(m)):
                return m
        raise _err("EQuery:Unknown asset pair")

    def _pairs(self, params: Mapping[str, Any]) -> list[Market]:
        """`pair=A,B` (ids or altnames) or every pair."""
        raw = str(params.get("pair") or "")
        if not raw:
            return list(self.emulator.markets.values())
        return [self._pair(p.strip()) for p in raw.split(",")]

    def _lot_decimals(self, m: Market) -> int:
        return _decimals(m.step, "lot size (amount_step)")

    def _pair_decimals(self, m: Market) -> int:
        return _decimals(m.tick, "price tick")

    def _by_txid(self, txid: str) -> Order | None:
        for order in self.emulator.orders.values():
            if _ident("O", order.order_id) == txid:
                return order
        return None

    def _descr(self, o: Order, m: Market) -> dict[str, str]:
        volume = _fixed(o.amount, 8)
        price = _fixed(o.price, self._pair_decimals(m)) if o.type != "market" else "0"
        at = f"limit {price}" if o.type != "market" else "market"
        return {
            "pair": pair_altname(m),
            "type": o.side,
            "ordertype": o.type if o.type != "limit_maker" else "limit",
            "price": price,
            "price2": "0",
            "leverage": "none",
            "order": f"{o.side} {volume} {pair_altname(m)} @ {at}",
            "close": "",
        }

    def _order_info(self, o: Order, with_trades: bool) -> dict[str, Any]:
        m = self.emulator.markets[o.market_id]
        decimals = self._pair_decimals(m)
        # the average price on the pair's decimals, as Kraken writes it; `cost` is exact
        average = (o.cost / o.filled).quantize(m.tick, rounding=ROUND_HALF_EVEN) if o.filled else Decimal(0)
        info: dict[str, Any] = {
            "refid": None,
            "userref": self._userrefs.get(o.order_id),
            "cl_ord_id": None if o.order_id in self._anonymous else o.client_order_id,
            "status": _STATUS.get(o.status, "canceled"),
            "reason": None,
            "opentm": _seconds(o.time),
            "starttm": 0,
            "expiretm": 0,
            "descr": self._descr(o, m),
            "vol": _fixed(o.amount, 8),
            "vol_exec": _fixed(o.filled, 8),
            "cost": plain(o.cost) if o.cost else "0.00000",
            "fee": plain(o.fee_total) if o.fee_total else "0.00000",
            "price": _fixed(average, decimals),
            "stopprice": "0.00000",
            "limitprice": "0.00000",
            "misc": "",
            "oflags": "fciq",
        }
        if not o.is_open:
            info["closetm"] = _seconds(o.update_time)
        if with_trades:
            info["trades"] = [_ident("T", t.id) for t in o.fills]
        return info

    def _trade_info(self, t: Trade) -> dict[str, Any]:
        order = self.emulator.orders[t.order_id]
        return {
            "ordertxid": _ident("O", t.order_id),
            "postxid": _ident("P", t.id),
            "pair": t.market_id,
            "time": _seconds(t.time),
            "type": "buy" if t.is_buyer else "sell",
            "ordertype": order.type if order.type != "limit_maker" else "limit",
            "price": plain(t.price),
            "cost": plain(t.quote_qty),
            "fee": plain(t.commission),
            "vol": _fixed(t.qty, 8),
            "margin": "0.00000",
            "leverage": "0",
            "misc": "",
            "trade_id": t.id,
            "maker": t.is_maker,
        }

    def _orders_matching(self, params: Mapping[str, Any], orders: Iterable[Order]) -> list[Order]:
        """The `cl_ord_id` / `userref` filters of OpenOrders and ClosedOrders."""
        chosen = list(orders)
        cl_ord_id = params.get("cl_ord_id")
        if cl_ord_id:
            chosen = [o for o in chosen if o.order_id not in self._anonymous and o.client_order_id == cl_ord_id]
        userref = params.get("userref")
        if userref not in (None, ""):
            try:
                ref = int(str(userref))
            except ValueError:
                raise _invalid("userref") from None
            chosen = [o for o in chosen if self._userrefs.get(o.order_id) == ref]
        return chosen

    # --- market data -----------------------------------------------------------------------------

    def _time(self, req: Request) -> Any:
        now = time.time()
        return {"unixtime": int(now), "rfc1123": time.strftime("%a, %d %b %y %H:%M:%S +0000", time.gmtime(now))}

    def _system_status(self, req: Request) -> Any:
        return {"status": "online", "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def _assets(self, req: Request) -> Any:
        codes = set(self.emulator.balances)
        for m in self.emulator.markets.values():
            codes.update((m.base, m.quote))
        wanted = {a.strip() for a in str(req.params.get("asset") or "").split(",") if a.strip()}
        out: dict[str, Any] = {}
        for code in sorted(codes):
            if wanted and not wanted & {code, asset_id(code), asset_altname(code)}:
                continue
            out[asset_id(code)] = {
                "aclass": "currency",
                "altname": asset_altname(code),
                "decimals": 10,
                "display_decimals": 5,
                "status": "enabled",
            }
        return out

    def _asset_pairs(self, req: Request) -> Any:
        out: dict[str, Any] = {}
        for m in self._pairs(req.params):
            # a JSON number, as Kraken writes its fee schedule ([volume, percent]): its shortest repr (0.26)
            # is what the client parses, the same digits as the Decimal fee
            percent = float(m.taker_fee * 100)
            out[m.id] = {
                "altname": pair_altname(m),
                "wsname": f"{asset_altname(m.base)}/{asset_altname(m.quote)}",
                "aclass_base": "currency",
                "base": asset_id(m.base),
                "aclass_quote": "currency",
                "quote": asset_id(m.quote),
                "lot": "unit",
                "cost_decimals": self._pair_decimals(m) + self._lot_decimals(m),
                "pair_decimals": self._pair_decimals(m),
                "lot_decimals": self._lot_decimals(m),
                "lot_multiplier": 1,
                "leverage_buy": [],
                "leverage_sell": [],
                "fees": [[0, percent]],
                "fees_maker": [[0, percent]],
                "fee_volume_currency": "ZUSD",
                "margin_call": 80,
                "margin_stop": 40,
                "ordermin": plain(m.step),
                "costmin": plain(m.min_notional),
                "tick_size": plain(m.tick),
                "status": "online",
            }
        return out

    def _ticker(self, req: Request) -> Any:
        out: dict[str, Any] = {}
        for m in self._pairs(req.params):
            decimals, last = self._pair_decimals(m), m.last()
            bid = m.bids[0] if m.bids else [Decimal(0), Decimal(0)]
            ask = m.asks[0] if m.asks else [Decimal(0), Decimal(0)]
            volume = _fixed(m.book_volume(), 8)
            low = bid[0] if m.bids else last
            high = ask[0] if m.asks else last

            def top(level: list[Decimal], decimals: int = decimals) -> list[str]:
                whole = level[1].to_integral_value(rounding=ROUND_DOWN)
                return [_fixed(level[0], decimals), str(whole), _fixed(level[1], 3)]

            out[m.id] = {
                "a": top(ask),
                "b": top(bid),
                "c": [_fixed(last, decimals), "0.00000000"],
                "v": [volume, volume],
                "p": [_fixed(last, decimals), _fixed(last, decimals)],
                "t": [0, 0],
                "l": [_fixed(low, decimals), _fixed(low, decimals)],
                "h": [_fixed(high, decimals), _fixed(high, decimals)],
                "o": _fixed(last, decimals),
            }
        return out

    def _depth(self, req: Request) -> Any:
        m = self._pair(req.params.get("pair"))
        count = _int_param(req.params, "count", 100)
        if count < 1 or count > 500:
            raise _invalid("count")
        decimals, stamp = self._pair_decimals(m), int(time.time())

        def rows(levels: list[list[Decimal]]) -> list[list[Any]]:
            return [[_fixed(p, decimals), _fixed(a, 8), stamp] for p, a in levels[:count]]

        return {m.id: {"asks": rows(m.asks), "bids": rows(m.bids)}}

    def _ohlc(self, req: Request) -> Any:
        m = self._pair(req.params.get("pair"))
        interval = _int_param(req.params, "interval", 1)
        if interval not in _INTERVALS:
            raise _invalid("interval")
        since = req.params.get("since")
        start = None
        if since not in (None, ""):
            start = (_int_param(req.params, "since", 0) + 1) * 1000
        step = interval * 60_000
        # weekly candles open on Monday 00:00 UTC; the Unix epoch was a Thursday
        offset = 4 * DAY_MS if interval >= 10080 else 0
        candles = self.emulator.candles(m, f"{interval}m", step, 720, start, None, offset_ms=offset)
        decimals = self._pair_decimals(m)
        rows = [
            [
                c.open_ms // 1000,
                _fixed(c.open, decimals),
                _fixed(c.high, decimals),
                _fixed(c.low, decimals),
                _fixed(c.close, decimals),
                _fixed(c.close, decimals),
                _fixed(c.volume, 8),
                100,
            ]
            for c in candles
        ]
        return {m.id: rows, "last": rows[-1][0] if rows else int(time.time())}

    # --- account ---------------------------------------------------------------------------------

    def _balance(self, req: Request) -> Any:
        return {asset_id(a): _fixed(b.free + b.locked, 10) for a, b in self.emulator.balances.items()}

    def _balance_ex(self, req: Request) -> Any:
        return {
            asset_id(a): {"balance": _fixed(b.free + b.locked, 10), "hold_trade": _fixed(b.locked, 10)}
            for a, b in self.emulator.balances.items()
        }

    def _trade_volume(self, req: Request) -> Any:
        markets = self._pairs(req.params) if req.params.get("pair") else []

        def tier(m: Market) -> dict[str, Any]:
            percent = f"{m.taker_fee * 100:.4f}"
            return {
                "fee": percent,
                "minfee": percent,
                "maxfee": percent,
                "nextfee": None,
                "tiervolume": "0.0000",
                "nextvolume": None,
            }

        return {
            "currency": "ZUSD",
            "volume": "0.0000",
            "fees": {m.id: tier(m) for m in markets},
            "fees_maker": {m.id: tier(m) for m in markets},
        }

    # --- orders ----------------------------------------------------------------------------------

    def _add_order(self, req: Request) -> Any:
        params = req.params
        for name in ("ordertype", "type", "volume", "pair"):
            if params.get(name) in (None, ""):
                raise _invalid(name)
        market = self._pair(params["pair"])
        cl_ord_id = params.get("cl_ord_id")
        userref = params.get("userref")
        if cl_ord_id not in (None, "") and userref not in (None, ""):
            raise _invalid("cl_ord_id")
        if cl_ord_id not in (None, "") and not valid_cl_ord_id(str(cl_ord_id)):
            raise _invalid("cl_ord_id")
        ref: int | None = None
        if userref not in (None, ""):
            try:
                ref = int(str(userref))
            except ValueError:
                raise _invalid("userref") from None
            if not -(2**31) <= ref < 2**31:
                raise _invalid("userref")
        test = _flag(params, "validate")
        client_id = str(cl_ord_id) if cl_ord_id else self.emulator.generated_client_id()
        order = self.emulator.submit(client_id, lambda: self._order_request(market, params), test=test)
        if order is None:
            return {"descr": {"order": self._describe_request(market, params)}}
        if not cl_ord_id:
            self._anonymous.add(order.order_id)
        if ref is not None:
            self._userrefs[order.order_id] = ref
        return {"descr": {"order": self._descr(order, market)["order"]}, "txid": [_ident("O", order.order_id)]}

    def _describe_request(self, m: Market, params: Mapping[str, Any]) -> str:
        volume = _fixed(Decimal(str(params["volume"])), 8)
        at = "market" if params["ordertype"] == "market" else f"limit {params.get('price')}"
        return f"{params['type']} {volume} {pair_altname(m)} @ {at}"

    def _order_request(self, market: Market, params: Mapping[str, Any]) -> OrderRequest:
        """Kraken's own checks of a new order, in Kraken's terms; the core's market checks follow."""
        deadline = params.get("deadline")
        if deadline not in (None, ""):
            try:
                due = datetime.fromisoformat(str(deadline).replace("Z", "+00:00"))
            except ValueError:
                raise _invalid("deadline") from None
            if due.tzinfo is None:
                raise _invalid("deadline")
            left = (due - datetime.now(UTC)).total_seconds()
            if left < 0:
                raise _err("EService:Deadline elapsed")
            if left > DEADLINE_MAX_SECONDS:
                raise _invalid("deadline")
        ordertype = params["ordertype"]
        if ordertype not in ("limit", "market"):
            raise _invalid("ordertype")  # other order types are not modelled here
        side = params["type"]
        if side not in ("buy", "sell"):
            raise _invalid("type")
        flags = {f.strip() for f in str(params.get("oflags") or "").split(",") if f.strip()}
        if flags - _OFLAGS or {"fciq", "fcib"} <= flags:
            raise _invalid("oflags")
        if flags & {"fcib", "post"}:
            raise _invalid("oflags")  # fee in base and post-only are not modelled here
        tif = str(params.get("timeinforce") or "GTC")
        if tif not in ("GTC", "IOC"):
            raise _invalid("timeinforce")  # GTD needs expiretm, not modelled here
        if ordertype == "market" and tif != "GTC":
            raise _invalid("timeinforce")
        volume = _decimal_param(params, "volume")
        in_quote = "viqc" in flags
        if in_quote:
            if ordertype != "market" or side != "buy":
                raise _invalid("viqc")
        elif _places(volume) > self._lot_decimals(market):
            raise _invalid("volume")
        elif volume < market.step:
            raise _err("EOrder:Order minimum not met")
        price: Decimal | None = None
        if ordertype == "limit":
            if params.get("price") in (None, ""):
                raise _invalid("price")
            price = _decimal_param(params, "price")
            decimals = self._pair_decimals(market)
            if _places(price) > decimals:
                raise _err(
                    f"EOrder:Invalid price:{pair_altname(market)} price can only be specified up to "
                    f"{decimals} decimals."
                )
            if volume * price < market.min_notional:
                raise _err("EOrder:Cost minimum not met")
        return OrderRequest(
            market=market,
            side="buy" if side == "buy" else "sell",
            type="limit" if ordertype == "limit" else "market",
            amount=None if in_quote else volume,
            quote_amount=volume if in_quote else None,
            price=price,
            time_in_force="IOC" if tif == "IOC" else "GTC" if ordertype == "limit" else "",
        )

    def _open_orders(self, req: Request) -> Any:
        orders = self._orders_matching(req.params, (o for o in self.emulator.orders.values() if o.is_open))
        with_trades = _flag(req.params, "trades")
        return {"open": {_ident("O", o.order_id): self._order_info(o, with_trades) for o in orders}}

    def _closed_orders(self, req: Request) -> Any:
        closed = [o for o in self.emulator.orders.values() if not o.is_open]
        orders = self._orders_matching(req.params, closed)
        start, end = _opt_seconds(req.params, "start"), _opt_seconds(req.params, "end")
        orders = [
            o
            for o in orders
            if (start is None or o.update_time > start * 1000) and (end is None or o.update_time <= end * 1000)
        ]
        orders.sort(key=lambda o: (o.update_time, o.order_id), reverse=True)
        offset = _int_param(req.params, "ofs", 0)
        with_trades = _flag(req.params, "trades")
        page = orders[offset : offset + PAGE]
        return {
            "closed": {_ident("O", o.order_id): self._order_info(o, with_trades) for o in page},
            "count": len(orders),
        }

    def _query_orders(self, req: Request) -> Any:
        raw = str(req.params.get("txid") or "")
        if not raw:
            raise _invalid("txid")
        with_trades = _flag(req.params, "trades")
        out: dict[str, Any] = {}
        for txid in (t.strip() for t in raw.split(",")):
            order = self._by_txid(txid)
            if order is None:
                raise _err("EOrder:Invalid order")
            out[txid] = self._order_info(order, with_trades)
        return self._orders_matching_map(req.params, out)

    def _orders_matching_map(self, params: Mapping[str, Any], infos: dict[str, Any]) -> dict[str, Any]:
        userref = params.get("userref")
        if userref in (None, ""):
            return infos
        return {k: v for k, v in infos.items() if str(v.get("userref")) == str(userref)}

    def _cancel_order(self, req: Request) -> Any:
        params = req.params
        cl_ord_id, txid = params.get("cl_ord_id"), str(params.get("txid") or "")
        if cl_ord_id:
            targets = self._orders_matching({"cl_ord_id": cl_ord_id}, self.emulator.orders.values())
        elif txid.isdigit() or txid.startswith("-"):
            targets = self._orders_matching({"userref": txid}, self.emulator.orders.values())
        elif txid:
            found = self._by_txid(txid)
            targets = [found] if found else []
        else:
            raise _invalid("txid")
        open_ = [o for o in targets if o.is_open]
        if not open_:
            raise _err("EOrder:Unknown order")
        for order in open_:
            self.emulator.cancel(order)
        return {"count": len(open_)}

    def _trades_history(self, req: Request) -> Any:
        trades = sorted(self.emulator.trades, key=lambda t: (t.time, t.id), reverse=True)
        start, end = _opt_seconds(req.params, "start"), _opt_seconds(req.params, "end")
        trades = [
            t for t in trades if (start is None or t.time > start * 1000) and (end is None or t.time <= end * 1000)
        ]
        offset = _int_param(req.params, "ofs", 0)
        page = trades[offset : offset + PAGE]
        return {"trades": {_ident("T", t.id): self._trade_info(t) for t in page}, "count": len(trades)}

    def _query_trades(self, req: Request) -> Any:
        raw = str(req.params.get("txid") or "")
        if not raw:
            raise _invalid("txid")
        by_id = {_ident("T", t.id): t for t in self.emulator.trades}
        out: dict[str, Any] = {}
        for txid in (t.strip() for t in raw.split(",")):
            if txid not in by_id:
                raise _invalid("txid")
            out[txid] = self._trade_info(by_id[txid])
        return out


def _decimal_param(params: Mapping[str, Any], name: str) -> Decimal:
    raw = str(params.get(name, ""))
    if not _DECIMAL_RE.match(raw):
        raise _invalid(name)
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise _invalid(name) from None


def _int_param(params: Mapping[str, Any], name: str, default: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(str(raw))
    except ValueError:
        raise _invalid(name) from None


def _opt_seconds(params: Mapping[str, Any], name: str) -> float | None:
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(str(raw))
    except ValueError:
        raise _invalid(name) from None


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    """An AddOrder `deadline` `offset_seconds` from now."""
    stamp = now_ms() / 1000 + offset_seconds
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
