"""Coinbase Advanced Trade REST (API v3), the dialect the real `ccxt.coinbase` client talks to over HTTP.

The core (`core.py`) keeps balances, books, matching, fees, faults and counts; this module is what is
Coinbase's, as ccxt 4.5 drives it (site-packages/ccxt/coinbase.py): the routes under `/api/v3/brokerage`
(plus the three public v2 reads `load_markets` makes for currencies), the CDP API key JWT, the answer
shapes, the failure envelopes, the client order id rules and the product ids (BTC-USD).

Behaviour modelled after Coinbase's published API reference (docs.cdp.coinbase.com, "Advanced Trade API"),
and why it matters to the callers:

* Authentication (CDP API keys, "Coinbase App authentication > API key authentication"): every private
  request carries `Authorization: Bearer <JWT>`, an ES256 (or Ed25519) JWT signed with the key's private
  key, `kid` and `sub` = the key name (`organizations/{org}/apiKeys/{key}`), `uri` = "METHOD host/path",
  `nbf` = issue time and `exp` at most 2 minutes later. That 2-minute lifetime is the exchange's own
  acceptance window: a request that reaches Coinbase after its token's `exp` is refused, one that arrives
  before is executed however long it was held on the way (the settle window of the profile is built on it).
  Every refusal (bad signature, unknown key, expired or not-yet-valid token, wrong `uri`, missing header,
  legacy `CB-ACCESS-*` HMAC headers, which Advanced Trade no longer accepts) answers HTTP 401 with the text
  body `Unauthorized`, as Coinbase does; a key without the needed scope answers 403 `PERMISSION_DENIED`.
  The signature is verified with the `cryptography` package (which ccxt itself depends on).
* Orders (`POST /orders`, "Create Order"): `client_order_id` is required; Coinbase documents it as
  "A unique ID provided for the order ... If the ID provided is not unique, the order will not be created
  and the order corresponding with that ID will be returned instead." So a repeated id is not refused: the
  answer is a success naming the EXISTING order (counted as a duplicate, never traded again), whatever
  product or side the repeat asked for. Ids are 1 to 128 characters (Coinbase's SDKs warn past 128).
  Refusals of an order are HTTP 200 with `success: false` and an `error_response` holding `error`,
  `message`, `error_details` and `preview_failure_reason`/`new_order_failure_reason`, the shape ccxt's
  `handle_errors` reads. Supported configurations: `sor_limit_ioc` (the protected order: an
  immediate-or-cancel limit sized in base units), `limit_limit_gtc`, `limit_limit_fok`, `market_market_ioc`
  (`base_size`, or `quote_size` for buys); anything else is `UNSUPPORTED_ORDER_CONFIGURATION`. An unknown
  field in the body is refused the way Coinbase's gateway does (`"error": "unknown"`, "proto: ... unknown
  field"). A create answer carries no status or fills: callers must read the order afterwards.
* Size rules from the product (`base_increment`, `base_min_size`, `quote_increment`/`price_increment`,
  `quote_min_size`), checked before balances: `INVALID_SIZE_PRECISION`, `PREVIEW_INVALID_BASE_SIZE_TOO_SMALL`,
  `INVALID_PRICE_PRECISION`, `PREVIEW_INVALID_QUOTE_SIZE_TOO_SMALL`; then `INSUFFICIENT_FUND`. Buys need
  the limit (or the walk's cost) plus the fee in the quote asset: Coinbase charges fees in the quote asset
  on both sides (`Dialect.fee_in = "quote"`), and reports them per fill (`commission`).
* Lookups: "Get Order" (`/orders/historical/{order_id}`) by Coinbase's order id only; "List Orders"
  (`/orders/historical/batch`) filters by `order_ids`, `product_ids`, `order_status`, `order_side`,
  `start_date`/`end_date` (on creation time), newest first, paged by `cursor`: there is NO filter by client
  order id, so a lookup by client id lists and matches. "List Fills" (`/orders/historical/fills`) by
  `order_ids`. "Cancel Orders" (`/orders/batch_cancel`) by order ids, per-order `success`/`failure_reason`.
* Market data: "List Public Products" with the increments and minimums above (ccxt's `load_markets`, which
  also reads `?product_type=FUTURE`, empty here, and, with credentials, the fee tier of
  `/transaction_summary`), "Get Best Bid/Ask" (`/best_bid_ask`, repeated `product_ids`), "Get Product Book"
  (`/market/product_book`), "Get Public Market Trades" (`/market/products/{id}/ticker`), "Get Public
  Product Candles" (granularity names, `start`/`end` in Unix seconds, at most 350 candles, newest first;
  synthesised by the core with the snapshot's volatility), accounts ("List Accounts", `available_balance`
  and `hold`, paged by `cursor`).
* Rate limits ("Advanced Trade API rate limits"): 30 private requests a second, enforced in a sliding
  one-second window (429 `rate_limit_exceeded`, with the core's `Retry-After`); public reads (10 a second)
  and the v2 reads are counted, not refused.
* Order and trade ids are UUIDs that encode the core's integer ids (reversible, no state).

Where the published API does not say, this dialect chose, and says so: the 429 body is the `errors` list
shape of ccxt's own table (production has also been seen answering an HTML page; ccxt raises the same class
for both); an accepted order whose outcome the gateway lost answers 504 `DEADLINE_EXCEEDED` and a failed
backend 500 `INTERNAL` / 503 `UNAVAILABLE` (the gRPC status names Coinbase's gateway errors carry); an
IOC, FOK or market remainder ends `CANCELLED` (ccxt reads `EXPIRED` the same way); List Orders shows an
order at once (no replication lag).

What the real ccxt 4.5 client raises for each answer (observed through this emulator, asserted in
tests/test_emulator_coinbase.py; the profile's error mapping relies on it):

=========================================================  ============================================
Coinbase answer                                             ccxt exception class
=========================================================  ============================================
401 `Unauthorized` (text)                                   AuthenticationError
403 `PERMISSION_DENIED`                                     PermissionDenied
429 `{"errors":[{"id":"rate_limit_exceeded"}]}`             RateLimitExceeded
5xx page (not JSON)                                         ExchangeNotAvailable
500 `INTERNAL` / 503 `UNAVAILABLE` (JSON)                   ExchangeError (the profile: transient)
504 `DEADLINE_EXCEEDED` (order outcome unknown)             ExchangeError (ccxt reads the JSON `error`
                                                            before the status: the profile must treat
                                                            it as an unknown outcome, never a refusal)
order refused, `PREVIEW_INSUFFICIENT_FUND`                  InsufficientFunds
order refused, size / price / notional rule                 ExchangeError (no ccxt class: the profile
                                                            maps the failure reasons)
order refused, `UNSUPPORTED_ORDER_CONFIGURATION`            ExchangeError
400 `INVALID_ARGUMENT`                                      BadRequest
400 `unknown` (unknown field)                               ExchangeError
404 `NOT_FOUND` "order with this orderID was not found"     ExchangeError (ccxt's broad pattern reads
                                                            "self orderID": it never matches)
batch_cancel result with `success: false`                   BadRequest
connection closed without an answer                         NetworkError
=========================================================  ============================================
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..exchange.profiles.coinbase import CoinbaseProfile
from .core import (
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

PREFIX = "/api/v3/brokerage"
# "JWTs expire after 2 minutes" (Coinbase App authentication): the longest a signed request stays valid
JWT_LIFETIME_S = 120
# how far in the future a token's `nbf` may lie (ccxt floors the clock to whole seconds)
JWT_EARLY_S = 2
CLIENT_ID_MAX = 128
MAX_CANDLES = 350
LIST_LIMIT_MAX = 1000
ACCOUNTS_LIMIT_MAX = 250
FIAT = frozenset({"USD", "EUR", "GBP", "CAD", "SGD"})
USER_ID = "5b3c1e2a-7f0d-5c8e-9a41-2f6d0e8b7c10"
PORTFOLIO_ID = "6a2e8f41-3c5b-5d7a-8e90-1b4c7d2f9e31"
_ORDER_UUID = re.compile(r"^c0b1a5e0-0000-4000-8000-([0-9a-f]{12})$")
_GRANULARITY = {
    "ONE_MINUTE": 60,
    "FIVE_MINUTE": 300,
    "FIFTEEN_MINUTE": 900,
    "THIRTY_MINUTE": 1800,
    "ONE_HOUR": 3600,
    "TWO_HOUR": 7200,
    "FOUR_HOUR": 14400,
    "SIX_HOUR": 21600,
    "ONE_DAY": 86400,
}
_CREATE_FIELDS = frozenset(
    {
        "client_order_id",
        "product_id",
        "side",
        "order_configuration",
        "self_trade_prevention_id",
        "leverage",
        "margin_type",
        "retail_portfolio_id",
        "preview_id",
        "attached_order_configuration",
        "sor_preference",
    }
)
_STATUS = {
    "open": "OPEN",
    "partially_filled": "OPEN",
    "filled": "FILLED",
    "canceled": "CANCELLED",
    # an IOC/FOK/market remainder that could not fill is cancelled by Coinbase, not "expired" (a GTD word)
    "expired": "CANCELLED",
}
_TIME_IN_FORCE = {"GTC": "GOOD_UNTIL_CANCELLED", "IOC": "IMMEDIATE_OR_CANCEL", "FOK": "FILL_OR_KILL"}
_PRICE_DP = Decimal("1e-16")  # Coinbase writes computed prices with 16 decimals
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _test_key_pem() -> str:
    """A fixed P-256 key in the SEC1 PEM form Coinbase hands out for CDP keys, derived from a public seed so
    that no key material sits in the source; it signs only requests to this emulator."""
    seed = hashlib.sha256(b"rebalance: coinbase emulator test key, not a credential").digest()
    scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return pem.decode()


DEFAULT_KEY_NAME = "organizations/0b6e3c1d-2a4f-4e8b-9c7d-1f2e3a4b5c6d/apiKeys/7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a"
DEFAULT_PRIVATE_KEY = _test_key_pem()


# --- small helpers -------------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _parse_iso(text: str, name: str) -> int:
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _invalid(f"invalid {name}: {text!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return int(stamp.timestamp() * 1000)


def _error(status: int, error: str, message: str) -> ApiError:
    """Coinbase's gateway error body (gRPC status name, message, details)."""
    return ApiError(status, {"error": error, "error_details": message, "message": message})


def _invalid(message: str) -> ApiError:
    return _error(400, "INVALID_ARGUMENT", message)


def _unauthorized() -> ApiError:
    return ApiError(401, b"Unauthorized")


def _one(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    if isinstance(value, list):
        value = value[-1] if value else None
    return None if value is None or value == "" else str(value)


def _many(params: Mapping[str, Any], *names: str) -> list[str]:
    """A repeated query parameter (`product_ids=A&product_ids=B`), also accepting its older singular form."""
    out: list[str] = []
    for name in names:
        value = params.get(name)
        if isinstance(value, list):
            out += [str(v) for v in value if v != ""]
        elif value not in (None, ""):
            out.append(str(value))
    return out


def _int(params: Mapping[str, Any], name: str) -> int | None:
    text = _one(params, name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise _invalid(f"invalid {name}: {text!r}") from None


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def order_uuid(order_id: int) -> str:
    return f"c0b1a5e0-0000-4000-8000-{order_id:012x}"


def _order_int(text: str) -> int | None:
    found = _ORDER_UUID.match(text.lower())
    return int(found.group(1), 16) if found else None


def _trade_uuid(trade_id: int) -> str:
    return f"c0b1a5e0-0000-4000-9000-{trade_id:012x}"


def _account_uuid(asset: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"coinbase-emulator:account:{asset}"))


# --- the dialect ---------------------------------------------------------------------------------


class CoinbaseDialect(Dialect):
    name = "coinbase"
    ccxt_id = "coinbase"
    credentials: ClassVar[dict[str, str]] = {"apiKey": DEFAULT_KEY_NAME, "secret": DEFAULT_PRIVATE_KEY}
    order_path = f"{PREFIX}/orders"
    # "Advanced Trade API rate limits": 30 requests a second per key for private endpoints, 10 for public
    # (the first is the one `rate_limit` faults set); public and v2 reads are counted, never refused, so that
    # tests creating many clients do not trip them
    budgets = (Budget("private"), Budget("public", limit=10, enforced=False), Budget("v2", enforced=False))
    weight_limit = 30
    weight_window = 1.0
    fee_in = "quote"
    fee_decimals = 16
    client_id_pattern = re.compile(rf"^.{{1,{CLIENT_ID_MAX}}}$", re.S)
    auth_codes = ("unauthorized", "permission_denied")
    default_auth_code = "unauthorized"
    content_type = "application/json; charset=utf-8"
    # what the profile gives every client: Advanced Trade's accounts (available and held), not the v2 wallets
    ccxt_options: ClassVar[dict[str, Any]] = dict(CoinbaseProfile.ccxt_options)
    # 3 s tokens (valid 2 to 3 s after signing, ccxt floors the time) keep recovery's settle waits at 5 s
    config_options: ClassVar[dict[str, Any]] = {"jwtLifetime": 3}

    def __init__(self) -> None:
        self._configs: dict[int, dict[str, Any]] = {}  # order id -> its order_configuration, as sent
        self._keys: dict[str, Any] = {}  # secret -> public key

    def routes(self) -> Mapping[tuple[str, str], Route]:
        one = const(1)  # Coinbase counts requests, not weights
        routes: dict[tuple[str, str], Route] = {
            ("GET", "/v2/currencies"): Route(self._currencies, one, budget="v2", name="markets"),
            ("GET", "/v2/currencies/crypto"): Route(self._crypto_currencies, one, budget="v2", name="markets"),
            ("GET", "/v2/exchange-rates"): Route(self._exchange_rates, one, budget="v2", name="markets"),
            ("GET", "/v2/time"): Route(self._v2_time, one, budget="v2"),
            ("GET", f"{PREFIX}/time"): Route(self._time, one, budget="public"),
            ("GET", f"{PREFIX}/best_bid_ask"): Route(self._best_bid_ask, one, signed=True, name="tickers"),
            ("GET", f"{PREFIX}/accounts"): Route(self._accounts, one, signed=True, name="balance"),
            ("GET", f"{PREFIX}/transaction_summary"): Route(self._transaction_summary, one, signed=True, name="fees"),
            ("GET", f"{PREFIX}/key_permissions"): Route(self._key_permissions, one, signed=True),
            ("POST", f"{PREFIX}/orders"): Route(
                self._create_order, one, signed=True, places_order=True, name="create_order"
            ),
            ("POST", f"{PREFIX}/orders/batch_cancel"): Route(self._batch_cancel, one, signed=True, name="cancel_order"),
            # Coinbase looks orders up by its own id or lists them: both are how a client finds an order
            ("GET", f"{PREFIX}/orders/historical/batch"): Route(
                self._list_orders, one, signed=True, name="fetch_order"
            ),
            ("GET", f"{PREFIX}/orders/historical/fills"): Route(self._fills, one, signed=True, name="trades"),
            ("GET", f"{PREFIX}/orders/historical/{{order_id}}"): Route(
                self._get_order, one, signed=True, name="fetch_order"
            ),
        }
        # the product reads exist twice: public under /market (what ccxt uses) and signed without it
        for market, signed, budget in ((f"{PREFIX}/market", False, "public"), (PREFIX, True, "")):
            reads = (
                ("/products", self._products, "markets"),
                ("/products/{product_id}", self._product, "markets"),
                ("/products/{product_id}/ticker", self._ticker, "tickers"),
                ("/products/{product_id}/candles", self._candles, "candles"),
                ("/product_book", self._product_book, "book"),
            )
            for path, handler, name in reads:
                routes[("GET", market + path)] = Route(handler, one, signed=signed, budget=budget, name=name)
        return routes

    def market_id(self, base: str, quote: str) -> str:
        return f"{base}-{quote}"

    def parse_params(self, method: str, query: str, body: str, headers: Mapping[str, str]) -> dict[str, Any]:
        """Query parameters, a repeated one as a list (`product_ids=A&product_ids=B`); a JSON body as it is."""
        params: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in params:
                previous = params[key]
                params[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
            else:
                params[key] = value
        text = body.strip()
        if text:
            with contextlib.suppress(ValueError):
                doc = json.loads(text)
                if isinstance(doc, dict):
                    params.update(doc)
        return params

    # --- answers the core asks for ---------------------------------------------------------------

    def _public_key(self) -> Any:
        secret = self.emulator.secret
        key = self._keys.get(secret)
        if key is None:
            if secret.strip().startswith("-----BEGIN"):
                private = serialization.load_pem_private_key(secret.encode(), password=None)
            else:  # an Ed25519 CDP key: base64 of seed + public key, ccxt signs with the first 32 bytes
                private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(secret)[:32])
            key = private.public_key()
            self._keys[secret] = key
        return key

    def authenticate(self, request: Request) -> None:
        """The CDP key JWT of "API key authentication": signature, key name, lifetime, `uri` claim."""
        auth = request.header("Authorization") or ""
        if not auth.startswith("Bearer "):
            raise _unauthorized()  # no token, or legacy CB-ACCESS-* HMAC headers
        try:
            head64, claims64, sig64 = auth[len("Bearer ") :].strip().split(".")
            header = json.loads(_b64url(head64))
            claims = json.loads(_b64url(claims64))
            signature = _b64url(sig64)
        except (ValueError, TypeError):
            raise _unauthorized() from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _unauthorized()
        key_name = self.emulator.api_key
        if header.get("kid") != key_name or claims.get("sub") != key_name:
            raise _unauthorized()
        if claims.get("iss") not in ("cdp", "coinbase-cloud"):
            raise _unauthorized()
        public = self._public_key()
        signed = f"{head64}.{claims64}".encode()
        try:
            if header.get("alg") == "ES256" and isinstance(public, ec.EllipticCurvePublicKey):
                if len(signature) != 64:
                    raise _unauthorized()
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
                public.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            elif header.get("alg") == "EdDSA" and isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signature, signed)
            else:
                raise _unauthorized()
        except InvalidSignature:
            raise _unauthorized() from None
        nbf, exp = claims.get("nbf"), claims.get("exp")
        if not isinstance(nbf, int) or not isinstance(exp, int) or exp <= nbf or exp - nbf > JWT_LIFETIME_S:
            raise _unauthorized()
        now = now_ms() / 1000
        if now + JWT_EARLY_S < nbf or now >= exp:
            raise _unauthorized()
        listed = claims.get("uris")  # Ed25519 keys sign a list of URIs, ES256 keys one `uri`
        uris: list[Any] = listed if isinstance(listed, list) else [claims.get("uri")]
        host = request.header("Host") or urlsplit(self.emulator.base_url).netloc
        wanted = f"{request.method} {host}{request.path}"
        # ccxt strips only "https://" from the URL it signs; over the loopback's http it keeps "http://"
        if not any(isinstance(u, str) and u.replace(" http://", " ", 1) == wanted for u in uris):
            raise _unauthorized()

    def auth_refusal(self, code: int | str) -> ApiError:
        if code == "permission_denied":
            return _error(403, "PERMISSION_DENIED", "Missing required scopes")
        return _unauthorized()

    def render_rejection(self, rejection: Rejection) -> ApiError:
        reason, detail = rejection.reason, rejection.detail
        if reason == "insufficient_funds":
            return _failure("INSUFFICIENT_FUND", "Insufficient balance in source account", "PREVIEW_INSUFFICIENT_FUND")
        if reason == "filter":
            if detail == "NOTIONAL":
                return _failure("UNKNOWN_FAILURE_REASON", "", "PREVIEW_INVALID_QUOTE_SIZE_TOO_SMALL")
            if detail == "PRICE_FILTER":
                return _failure("INVALID_PRICE_PRECISION", "Invalid price precision", None)
            return _failure("UNKNOWN_FAILURE_REASON", "", "PREVIEW_INVALID_BASE_SIZE_TOO_SMALL")
        if reason == "would_take":
            return _failure("INVALID_LIMIT_PRICE_POST_ONLY", "Invalid limit price for post only order", None)
        if reason == "unknown_market":
            return _failure("INVALID_PRODUCT_ID", "Invalid product_id", "PREVIEW_INVALID_PRODUCT_ID")
        if reason == "duplicate_client_id":  # never raised here: a repeated id answers with its order
            return _invalid("duplicate client_order_id")
        return _not_found()

    def rate_limited(self, limit: int, used: int, retry_after: int) -> ApiError:
        return ApiError(429, {"errors": [{"id": "rate_limit_exceeded", "message": "Too many requests"}]})

    def unknown_route(self, method: str, path: str) -> ApiError:
        return _error(404, "NOT_FOUND", "Not Found")

    def internal_error(self, status: int) -> ApiError:
        """Coinbase's gateway names the gRPC status of a failed backend: INTERNAL (500), UNAVAILABLE (503)."""
        return _error(status, "UNAVAILABLE" if status == 503 else "INTERNAL", "internal error, please retry")

    def unknown_status(self) -> ApiError:
        """The gateway gave up waiting for the order service: the order may or may not exist."""
        return _error(504, "DEADLINE_EXCEEDED", "context deadline exceeded")

    # --- market data -----------------------------------------------------------------------------

    def _product_market(self, product_id: str | None) -> Market:
        market = self.emulator.markets.get(product_id or "")
        if market is None:
            raise _error(404, "NOT_FOUND", "ProductID is invalid" if product_id else "product_id is required")
        return market

    def _currency_names(self) -> dict[str, str]:
        assets = {m.base for m in self.emulator.markets.values()} | {m.quote for m in self.emulator.markets.values()}
        return {a: a for a in sorted(assets | set(self.emulator.balances))}

    def _currencies(self, req: Request) -> Any:
        return {
            "data": [{"id": a, "name": n, "min_size": "0.01"} for a, n in self._currency_names().items() if a in FIAT]
        }

    def _crypto_currencies(self, req: Request) -> Any:
        return {
            "data": [
                {
                    "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"coinbase-emulator:asset:{a}")),
                    "code": a,
                    "name": n,
                    "color": "#0052FF",
                    "sort_index": i,
                    "exponent": 8,
                    "type": "crypto",
                    "address_regex": "",
                }
                for i, (a, n) in enumerate(self._currency_names().items())
                if a not in FIAT
            ]
        }

    def _exchange_rates(self, req: Request) -> Any:
        base = _one(req.params, "currency") or "USD"
        rates: dict[str, str] = {base: "1"}
        for m in self.emulator.markets.values():
            if m.quote == base and m.mid() > 0:
                rates[m.base] = plain((1 / m.mid()).quantize(Decimal("1e-12")))
        return {"data": {"currency": base, "rates": rates}}

    def _v2_time(self, req: Request) -> Any:
        now = now_ms()
        return {"data": {"iso": _iso(now), "epoch": now // 1000}}

    def _time(self, req: Request) -> Any:
        now = now_ms()
        return {"iso": _iso(now), "epochSeconds": str(now // 1000), "epochMillis": str(now)}

    def _product_doc(self, m: Market) -> dict[str, Any]:
        last = m.last()
        return {
            "product_id": m.id,
            "price": plain(last),
            "price_percentage_change_24h": "0",
            "volume_24h": plain(m.book_volume()),
            "volume_percentage_change_24h": "0",
            "base_increment": plain(m.step),
            "quote_increment": plain(m.tick),
            "quote_min_size": plain(m.min_notional),
            "quote_max_size": "150000000",
            "base_min_size": plain(m.step),
            "base_max_size": "9000000000",
            "base_name": m.base,
            "quote_name": m.quote,
            "watched": False,
            "is_disabled": False,
            "new": False,
            "status": "online",
            "cancel_only": False,
            "limit_only": False,
            "post_only": False,
            "trading_disabled": False,
            "auction_mode": False,
            "product_type": "SPOT",
            "quote_currency_id": m.quote,
            "base_currency_id": m.base,
            "fcm_trading_session_details": None,
            "mid_market_price": "",
            "alias": "",
            "alias_to": [],
            "base_display_symbol": m.base,
            "quote_display_symbol": m.quote,
            "view_only": False,
            "price_increment": plain(m.tick),
            "display_name": f"{m.base}-{m.quote}",
            "product_venue": "CBE",
            "approximate_quote_24h_volume": plain((m.book_volume() * last).quantize(Decimal("0.01"))),
        }

    def _products(self, req: Request) -> Any:
        """ "List Public Products": SPOT only (a FUTURE listing is empty), optionally by `product_ids`."""
        if (_one(req.params, "product_type") or "SPOT") != "SPOT":
            return {"products": [], "num_products": 0}
        wanted = _many(req.params, "product_ids")
        markets = [m for m in self.emulator.markets.values() if not wanted or m.id in wanted]
        return {"products": [self._product_doc(m) for m in markets], "num_products": len(markets)}

    def _product(self, req: Request) -> Any:
        return self._product_doc(self._product_market(req.path_params.get("product_id")))

    def _ticker(self, req: Request) -> Any:
        m = self._product_market(req.path_params.get("product_id"))
        limit = max(1, min(_int(req.params, "limit") or 100, 1000))
        trades = [t for t in reversed(self.emulator.trades) if t.market_id == m.id][:limit]
        return {
            "trades": [
                {
                    "trade_id": str(t.id),
                    "product_id": m.id,
                    "price": plain(t.price),
                    "size": plain(t.qty),
                    "time": _iso(t.time),
                    # the taker's side, as Coinbase's market trades report it
                    "side": "BUY" if t.is_buyer else "SELL",
                    "bid": "",
                    "ask": "",
                    "exchange": "coinbase",
                }
                for t in trades
            ],
            "best_bid": plain(m.bids[0][0]) if m.bids else "",
            "best_ask": plain(m.asks[0][0]) if m.asks else "",
        }

    def _book_doc(self, m: Market, depth: int | None) -> dict[str, Any]:
        bids = m.bids if depth is None else m.bids[:depth]
        asks = m.asks if depth is None else m.asks[:depth]
        return {
            "product_id": m.id,
            "bids": [{"price": plain(p), "size": plain(a)} for p, a in bids],
            "asks": [{"price": plain(p), "size": plain(a)} for p, a in asks],
            "time": _iso(now_ms()),
        }

    def _product_book(self, req: Request) -> Any:
        m = self._product_market(_one(req.params, "product_id"))
        limit = _int(req.params, "limit")
        book = self._book_doc(m, limit if limit and limit > 0 else None)
        mid = m.mid()
        spread = (m.asks[0][0] - m.bids[0][0]) if m.bids and m.asks else Decimal(0)
        return {
            "pricebook": book,
            "last": plain(m.last()),
            "mid_market": plain(mid),
            "spread_bps": plain((spread / mid * 10000).quantize(Decimal("0.0001"))) if mid else "0",
            "spread_absolute": plain(spread),
        }

    def _best_bid_ask(self, req: Request) -> Any:
        wanted = _many(req.params, "product_ids")
        markets = [self._product_market(i) for i in wanted] if wanted else list(self.emulator.markets.values())
        return {"pricebooks": [self._book_doc(m, 1) for m in markets]}

    def _candles(self, req: Request) -> Any:
        """ "Get Product Candles": granularity by name, `start`/`end` in Unix seconds, at most 350, newest first."""
        m = self._product_market(req.path_params.get("product_id"))
        name = _one(req.params, "granularity")
        if name is None or name not in _GRANULARITY:
            raise _invalid(f"invalid granularity: {name!r}")
        start, end = _int(req.params, "start"), _int(req.params, "end")
        if start is None or end is None:
            raise _invalid("start and end are required")
        step = _GRANULARITY[name]
        if end < start:
            raise _invalid("end must be after start")
        if (end - start) // step > MAX_CANDLES:
            raise _invalid(f"number of candles requested should be less than or equal to {MAX_CANDLES}")
        limit = _int(req.params, "limit")
        count = (end - start) // step + 1
        candles = self.emulator.candles(m, name, step * 1000, min(count, limit or count), start * 1000, end * 1000)
        return {
            "candles": [
                {
                    "start": str(c.open_ms // 1000),
                    "low": plain(c.low),
                    "high": plain(c.high),
                    "open": plain(c.open),
                    "close": plain(c.close),
                    "volume": plain(c.volume),
                }
                for c in reversed(candles)
            ]
        }

    # --- account ---------------------------------------------------------------------------------

    def _accounts(self, req: Request) -> Any:
        """ "List Accounts": one account per currency, `available_balance` and `hold`, paged by `cursor`."""
        limit = max(1, min(_int(req.params, "limit") or 49, ACCOUNTS_LIMIT_MAX))
        offset = _int(req.params, "cursor") or 0
        assets = sorted(self.emulator.balances)
        page = assets[offset : offset + limit]
        stamp = _iso(self.emulator.balance_update_ms)
        accounts = []
        for asset in page:
            b = self.emulator.balances[asset]
            accounts.append(
                {
                    "uuid": _account_uuid(asset),
                    "name": f"{asset} Wallet",
                    "currency": asset,
                    "available_balance": {"value": plain(b.free), "currency": asset},
                    "default": True,
                    "active": True,
                    "created_at": "2024-01-01T00:00:00.000Z",
                    "updated_at": stamp,
                    "deleted_at": None,
                    "type": "ACCOUNT_TYPE_FIAT" if asset in FIAT else "ACCOUNT_TYPE_CRYPTO",
                    "ready": True,
                    "hold": {"value": plain(b.locked), "currency": asset},
                    "retail_portfolio_id": PORTFOLIO_ID,
                    "platform": "ACCOUNT_PLATFORM_CONSUMER",
                }
            )
        more = offset + limit < len(assets)
        return {
            "accounts": accounts,
            "has_next": more,
            "cursor": str(offset + limit) if more else "",
            "size": len(accounts),
        }

    def _transaction_summary(self, req: Request) -> Any:
        """ "Get Transaction Summary": the account's one fee tier (Coinbase prices every spot product by it)."""
        fee = plain(self.emulator.account_fee())
        volume = sum((t.quote_qty for t in self.emulator.trades), Decimal(0))
        fees = sum((t.commission for t in self.emulator.trades), Decimal(0))
        return {
            "total_volume": plain(volume),
            "total_fees": plain(fees),
            "fee_tier": {
                "pricing_tier": "Advanced 1",
                "usd_from": "0",
                "usd_to": "10000",
                "taker_fee_rate": fee,
                "maker_fee_rate": fee,
                "aop_from": "",
                "aop_to": "",
            },
            "margin_rate": None,
            "goods_and_services_tax": None,
            "advanced_trade_only_volume": plain(volume),
            "advanced_trade_only_fees": plain(fees),
            "coinbase_pro_volume": 0,
            "coinbase_pro_fees": 0,
            "total_balance": "",
            "has_promo_fee": False,
        }

    def _key_permissions(self, req: Request) -> Any:
        return {
            "can_view": True,
            "can_trade": True,
            "can_transfer": False,
            "portfolio_uuid": PORTFOLIO_ID,
            "portfolio_type": "DEFAULT",
        }

    # --- orders ----------------------------------------------------------------------------------

    def _create_order(self, req: Request) -> Any:
        """ "Create Order" (see the module docstring for the id rule, the envelopes and the checks)."""
        params = req.params
        unknown = sorted(set(params) - _CREATE_FIELDS)
        if unknown:
            message = f'proto: (line 1:2): unknown field "{unknown[0]}"'
            raise ApiError(400, {"error": "unknown", "error_details": message, "message": message})
        client_id = params.get("client_order_id")
        if not isinstance(client_id, str) or not client_id:
            raise _invalid("client_order_id is required")
        if not self.client_id_pattern.match(client_id):
            raise _invalid(f"client_order_id must be at most {CLIENT_ID_MAX} characters")
        config = params.get("order_configuration")
        existing = self.emulator.find_order(None, client_order_id=client_id)
        if existing is not None:
            # "If the ID provided is not unique, the order will not be created and the order corresponding
            # with that ID will be returned instead."
            self.emulator.count(client_id, "duplicates")
            return _created(existing, self._configs.get(existing.order_id) or _configuration(existing))
        order = self.emulator.submit(client_id, lambda: self._order_request(params))
        assert order is not None
        self._configs[order.order_id] = config if isinstance(config, dict) else {}
        return _created(order, self._configs[order.order_id])

    def _order_request(self, params: Mapping[str, Any]) -> OrderRequest:
        """Coinbase's checks of a new order, in its order: product, side, configuration, size rules."""
        config = params.get("order_configuration")
        product_id = params.get("product_id")
        market = self.emulator.markets.get(product_id) if isinstance(product_id, str) else None
        if market is None:
            raise _failure("INVALID_PRODUCT_ID", "Invalid product_id", "PREVIEW_INVALID_PRODUCT_ID", config)
        side = params.get("side")
        if side not in ("BUY", "SELL"):
            raise _failure("INVALID_SIDE", "Invalid side", "PREVIEW_INVALID_SIDE", config)
        if not isinstance(config, dict) or len(config) != 1:
            raise _invalid("order_configuration must hold exactly one configuration")
        ((kind, spec),) = config.items()
        if kind not in ("sor_limit_ioc", "limit_limit_gtc", "limit_limit_fok", "market_market_ioc") or not isinstance(
            spec, dict
        ):
            unsupported = ("UNSUPPORTED_ORDER_CONFIGURATION", "Unsupported order configuration")
            raise _failure(*unsupported, "PREVIEW_INVALID_ORDER_CONFIG", config)
        buy = side == "BUY"
        base_size = _size(spec, "base_size")
        if kind == "market_market_ioc":
            quote_size = _size(spec, "quote_size")
            if (base_size is None) == (quote_size is None):
                raise _invalid("exactly one of base_size and quote_size is required")
            if quote_size is not None:
                if not buy:
                    raise _failure("UNSUPPORTED_ORDER_CONFIGURATION", "quote_size is for buys", None, config)
                if quote_size % market.tick:
                    raise _failure("UNKNOWN_FAILURE_REASON", "", "PREVIEW_INVALID_QUOTE_SIZE_PRECISION", config)
                if quote_size < market.min_notional:
                    raise _failure("UNKNOWN_FAILURE_REASON", "", "PREVIEW_INVALID_QUOTE_SIZE_TOO_SMALL", config)
                return OrderRequest(market=market, side="buy", type="market", quote_amount=quote_size)
            assert base_size is not None
            self._check_size(market, base_size, base_size * market.mid(), config)
            return OrderRequest(market=market, side="buy" if buy else "sell", type="market", amount=base_size)
        price = _size(spec, "limit_price")
        if base_size is None or price is None:
            raise _invalid("base_size and limit_price are required")
        if price % market.tick:
            raise _failure(
                "INVALID_PRICE_PRECISION", "Invalid price precision", "PREVIEW_INVALID_PRICE_PRECISION", config
            )
        self._check_size(market, base_size, base_size * price, config)
        post_only = kind == "limit_limit_gtc" and spec.get("post_only") is True
        return OrderRequest(
            market=market,
            side="buy" if buy else "sell",
            type="limit_maker" if post_only else "limit",
            amount=base_size,
            price=price,
            time_in_force={"sor_limit_ioc": "IOC", "limit_limit_fok": "FOK"}.get(kind, "GTC"),  # type: ignore[arg-type]
        )

    @staticmethod
    def _check_size(market: Market, base_size: Decimal, notional: Decimal, config: Any) -> None:
        if base_size % market.step:
            raise _failure("INVALID_SIZE_PRECISION", "Invalid order size precision", None, config)
        if base_size < market.step:
            raise _failure("UNKNOWN_FAILURE_REASON", "", "PREVIEW_INVALID_BASE_SIZE_TOO_SMALL", config)
        if notional < market.min_notional:
            raise _failure("UNKNOWN_FAILURE_REASON", "", "PREVIEW_INVALID_QUOTE_SIZE_TOO_SMALL", config)

    def _order_doc(self, o: Order) -> dict[str, Any]:
        market = self.emulator.markets[o.market_id]
        fees = o.fee_total
        by_quote = o.type == "market" and o.quote_amount > 0
        average = (o.cost / o.filled).quantize(_PRICE_DP) if o.filled else Decimal(0)
        asked = o.quote_amount if by_quote else o.amount
        done = o.cost if by_quote else o.filled
        return {
            "order_id": order_uuid(o.order_id),
            "product_id": o.market_id,
            "user_id": USER_ID,
            "order_configuration": self._configs.get(o.order_id) or _configuration(o),
            "side": o.side.upper(),
            "client_order_id": o.client_order_id,
            "status": _STATUS[o.status],
            "time_in_force": _TIME_IN_FORCE.get(o.time_in_force, "GOOD_UNTIL_CANCELLED"),
            "created_time": _iso(o.time),
            "completion_percentage": plain((done / asked * 100).quantize(Decimal("0.01"))) if asked else "0",
            "filled_size": plain(o.filled),
            "average_filled_price": plain(average),
            "fee": "",
            "number_of_fills": str(len(o.fills)),
            "filled_value": plain(o.cost),
            "pending_cancel": False,
            "size_in_quote": by_quote,
            "total_fees": plain(fees),
            "size_inclusive_of_fees": False,
            "total_value_after_fees": plain(o.cost + fees if o.side == "buy" else o.cost - fees),
            "trigger_status": "INVALID_ORDER_TYPE",
            "order_type": "MARKET" if o.type == "market" else "LIMIT",
            "reject_reason": "REJECT_REASON_UNSPECIFIED",
            "settled": not o.is_open,
            "product_type": "SPOT",
            "reject_message": "",
            "cancel_message": "" if o.status in ("open", "partially_filled", "filled") else "Order cancelled",
            "order_placement_source": "RETAIL_ADVANCED",
            "outstanding_hold_amount": plain(o.locked),
            "is_liquidation": False,
            "last_fill_time": _iso(o.fills[-1].time) if o.fills else None,
            "edit_history": [],
            "leverage": "",
            "margin_type": "UNKNOWN_MARGIN_TYPE",
            "retail_portfolio_id": PORTFOLIO_ID,
            "originating_order_id": "",
            "attached_order_id": "",
            "attached_order_configuration": None,
            "base_currency": market.base,
            "quote_currency": market.quote,
        }

    def _get_order(self, req: Request) -> Any:
        order_id = _order_int(req.path_params.get("order_id", ""))
        order = self.emulator.find_order(None, order_id=order_id) if order_id is not None else None
        if order is None:
            raise _not_found()
        return {"order": self._order_doc(order)}

    def _list_orders(self, req: Request) -> Any:
        """ "List Orders": newest first; filters by ids, products, statuses, side and creation time."""
        p = req.params
        ids = {i for i in (_order_int(x) for x in _many(p, "order_ids")) if i is not None}
        wanted_ids = bool(_many(p, "order_ids"))
        products = set(_many(p, "product_ids", "product_id"))
        statuses = set(_many(p, "order_status"))
        if "OPEN" in statuses and len(statuses) > 1:
            raise _invalid("OPEN orders cannot be combined with other order statuses")
        order_side = _one(p, "order_side")
        start = _parse_iso(s, "start_date") if (s := _one(p, "start_date")) else None
        end = _parse_iso(e, "end_date") if (e := _one(p, "end_date")) else None
        limit = max(1, min(_int(p, "limit") or LIST_LIMIT_MAX, LIST_LIMIT_MAX))
        offset = _int(p, "cursor") or 0
        chosen = [
            o
            for o in sorted(self.emulator.orders.values(), key=lambda o: (o.time, o.order_id), reverse=True)
            if (not wanted_ids or o.order_id in ids)
            and (not products or o.market_id in products)
            and (not statuses or _STATUS[o.status] in statuses)
            and (order_side is None or o.side.upper() == order_side)
            and (start is None or o.time >= start)
            and (end is None or o.time <= end)
        ]
        page = chosen[offset : offset + limit]
        more = offset + limit < len(chosen)
        return {
            "orders": [self._order_doc(o) for o in page],
            "sequence": "0",
            "has_next": more,
            "cursor": str(offset + limit) if more else "",
        }

    def _fill_doc(self, t: Trade) -> dict[str, Any]:
        return {
            "entry_id": hashlib.sha256(f"fill:{t.id}".encode()).hexdigest(),
            "trade_id": _trade_uuid(t.id),
            "order_id": order_uuid(t.order_id),
            "trade_time": _iso(t.time),
            "trade_type": "FILL",
            "price": plain(t.price),
            "size": plain(t.qty),
            "commission": plain(t.commission),
            "product_id": t.market_id,
            "sequence_timestamp": _iso(t.time),
            "liquidity_indicator": "MAKER" if t.is_maker else "TAKER",
            "size_in_quote": False,
            "user_id": USER_ID,
            "side": "BUY" if t.is_buyer else "SELL",
            "retail_portfolio_id": PORTFOLIO_ID,
        }

    def _fills(self, req: Request) -> Any:
        """ "List Fills": newest first, by `order_ids` / `trade_ids` / `product_ids` and sequence time."""
        p = req.params
        order_ids = {i for i in (_order_int(x) for x in _many(p, "order_ids", "order_id")) if i is not None}
        by_order = bool(_many(p, "order_ids", "order_id"))
        products = set(_many(p, "product_ids", "product_id"))
        start = _parse_iso(s, "start_sequence_timestamp") if (s := _one(p, "start_sequence_timestamp")) else None
        end = _parse_iso(e, "end_sequence_timestamp") if (e := _one(p, "end_sequence_timestamp")) else None
        limit = max(1, min(_int(p, "limit") or 100, LIST_LIMIT_MAX))
        offset = _int(p, "cursor") or 0
        chosen = [
            t
            for t in reversed(self.emulator.trades)
            if (not by_order or t.order_id in order_ids)
            and (not products or t.market_id in products)
            and (start is None or t.time >= start)
            and (end is None or t.time <= end)
        ]
        page = chosen[offset : offset + limit]
        more = offset + limit < len(chosen)
        return {"fills": [self._fill_doc(t) for t in page], "cursor": str(offset + limit) if more else ""}

    def _batch_cancel(self, req: Request) -> Any:
        """ "Cancel Orders": one result per id; only an open order can be cancelled."""
        ids = req.params.get("order_ids")
        if not isinstance(ids, list) or not ids:
            raise _invalid("order_ids is required")
        results = []
        for raw in ids:
            order_id = _order_int(str(raw))
            order = self.emulator.find_order(None, order_id=order_id) if order_id is not None else None
            if order is None:
                results.append({"success": False, "failure_reason": "UNKNOWN_CANCEL_ORDER", "order_id": str(raw)})
            elif not order.is_open:
                reason = "DUPLICATE_CANCEL_REQUEST" if order.status == "canceled" else "INVALID_CANCEL_REQUEST"
                results.append({"success": False, "failure_reason": reason, "order_id": str(raw)})
            else:
                self.emulator.cancel(order)
                results.append(
                    {"success": True, "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON", "order_id": str(raw)}
                )
        return {"results": results}


# --- answer shapes -------------------------------------------------------------------------------


def _size(spec: Mapping[str, Any], name: str) -> Decimal | None:
    value = spec.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a decimal string")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _invalid(f"invalid {name}: {value!r}") from None
    if not number.is_finite() or number <= 0:
        raise _invalid(f"invalid {name}: {value!r}")
    return number


def _failure(error: str, message: str, preview: str | None, config: Any = None) -> ApiError:
    """An order Coinbase refused: HTTP 200, `success: false`, the reasons in `error_response`."""
    response: dict[str, Any] = {"error": error, "message": message, "error_details": ""}
    if preview is not None:
        response["preview_failure_reason"] = preview
    if error != "UNKNOWN_FAILURE_REASON":
        response["new_order_failure_reason"] = error
    return ApiError(
        200,
        {
            "success": False,
            "failure_reason": "UNKNOWN_FAILURE_REASON",
            "order_id": "",
            "error_response": response,
            "order_configuration": config if isinstance(config, dict) else {},
        },
    )


def _configuration(o: Order) -> dict[str, Any]:
    """The `order_configuration` of an order placed without this dialect (another client of the account)."""
    if o.type == "market":
        size = {"quote_size": plain(o.quote_amount)} if o.quote_amount else {"base_size": plain(o.amount)}
        return {"market_market_ioc": size}
    spec = {"base_size": plain(o.amount), "limit_price": plain(o.price)}
    if o.time_in_force == "IOC":
        return {"sor_limit_ioc": spec}
    if o.time_in_force == "FOK":
        return {"limit_limit_fok": spec}
    return {"limit_limit_gtc": {**spec, "post_only": o.type == "limit_maker"}}


def _not_found() -> ApiError:
    return _error(404, "NOT_FOUND", "order with this orderID was not found")


def _created(order: Order, config: Mapping[str, Any]) -> dict[str, Any]:
    ident = order_uuid(order.order_id)
    return {
        "success": True,
        "failure_reason": "UNKNOWN_FAILURE_REASON",
        "order_id": ident,
        "success_response": {
            "order_id": ident,
            "product_id": order.market_id,
            "side": order.side.upper(),
            "client_order_id": order.client_order_id,
            "attached_order_id": "",
        },
        "order_configuration": dict(config),
    }
