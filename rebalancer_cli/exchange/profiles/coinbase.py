"""Coinbase Advanced Trade: proven for plan, snapshot and execute against `rebalancer_cli.testing.coinbase`.

What ccxt 4.5's `coinbase` client does (site-packages/ccxt/coinbase.py) and what this profile does about it:

* Client order id: Advanced Trade takes any `client_order_id` up to 128 characters ("Create Order"), so the
  36-character dashed UUIDv7 key goes as it is. ccxt IGNORES the unified `clientOrderId` and sends its own
  `ccxt-<uuid4>` unless `client_order_id` is among the params (its `create_order` extends the request with
  them), so the profile passes `client_order_id` itself.
* Duplicate ids: Coinbase does not refuse a repeated `client_order_id`: "If the ID provided is not unique,
  the order will not be created and the order corresponding with that ID will be returned instead." A
  resend of a key is therefore answered with the first order, never traded twice; there is no duplicate
  error to recognise.
* Lookup by client id: ccxt's `fetch_order(None, ..., {"clientOrderId": ...})` asks for
  `/orders/historical/None`, and Coinbase's Get Order takes its own order id only; List Orders
  (`GET /orders/historical/batch`, implicit `v3PrivateGetBrokerageOrdersHistoricalBatch`) has no client id
  filter either. So the profile lists the product's orders created since the key's own UUIDv7 time (less
  five minutes of clock skew), newest first, page by `cursor`, and matches `client_order_id`; ccxt's
  `parse_order` reads the match. Cancel: that lookup, then ccxt's `cancel_order` by Coinbase's order id
  (`/orders/batch_cancel`); an order already final is left as it is.
* Create answer: `success_response` names the order and nothing else (no status, no fills), so `create`
  reads the order back by its id (Get Order, a read that may be retried) before answering; if that read
  fails, the bare answer (not final) goes back and the executor settles the order by a lookup of its key.
* Protected order: `sor_limit_ioc` {base_size, limit_price}, what ccxt sends for a limit with
  timeInForce=IOC: sized in base units, so no "market buy needs a price" refusal.
* Settle window: a request is authorised by a JWT that expires when its `exp` passes (CDP API key
  authentication: at most 2 minutes after `nbf`), and Coinbase refuses it afterwards (401), so a request
  held on its way longer than its token's lifetime can no longer trade. ccxt signs every request with a
  fresh token right before sending it, always valid 120 s; `exchange.options.jwtLifetime` (seconds, 1 to
  120) makes the profile sign shorter-lived tokens instead (the same claims, through ccxt's own `jwt`), and
  the settle window is that lifetime plus 2 s: 122 s by default. The 2 s assume Coinbase's clock is at most
  2 s behind this host's (NTP on both; ccxt's whole-second `nbf` only makes a token end earlier). A shorter
  lifetime shortens every recovery wait, at the price of refusals when this host's clock runs behind.
* Errors, as ccxt raises them: a 401 is AuthenticationError and PERMISSION_DENIED PermissionDenied (key
  refusals by class); `INSUFFICIENT_FUND` InsufficientFunds; size, price and notional refusals
  (`PREVIEW_INVALID_BASE_SIZE_TOO_SMALL`, `INVALID_SIZE_PRECISION`, ...) come as a plain ExchangeError,
  recognised here as filter failures; a gateway's `DEADLINE_EXCEEDED` / `INTERNAL` / `UNAVAILABLE` JSON
  also comes as a plain ExchangeError (ccxt reads the body before the 5xx status) and is transient: a read
  is retried, an order is looked up, never re-sent blindly.
* Balances: Advanced Trade's accounts (`/brokerage/accounts`: available and hold), not ccxt's default v2
  wallets, which report one total and no hold (`ccxt_options`).
* Fees: `fetchTradingFees` (`/transaction_summary`): the account's fee tier, the same on every spot product.
  Lot size `base_increment` (ccxt precision.amount), min size `base_min_size` (limits.amount.min), min
  notional `quote_min_size` (limits.cost.min), price tick `price_increment`/`quote_increment`.
* Sandbox: none. ccxt has no test URLs for coinbase, and Advanced Trade's sandbox answers static mock data
  (it is not a testnet), so `exchange.sandbox: true` is refused; try a first `execute` with a small
  portfolio and `max_trade_notional` instead.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from ...errors import ExchangeError, InputError, OrderNotFoundError
from ...ids import key_time_ms
from ..base import Protection
from .base import Capability, ExchangeProfile, FeeSource, Venue

# Coinbase's CDP key JWT lives at most 120 s ("exp" - "nbf"), what ccxt always signs; 2 s for the clocks' skew
JWT_LIFETIME_S = 120
CLOCK_SKEW_S = 2.0
LIFETIME_OPTION = "jwtLifetime"
LOOKBACK_MS = 5 * 60 * 1000
PAGE = 250
# ccxt's words for the statuses an order cannot leave (OPEN, QUEUED, CANCEL_QUEUED can still be cancelled)
FINAL = frozenset({"closed", "canceled", "expired", "rejected"})


class CoinbaseProfile(ExchangeProfile):
    id: ClassVar[str] = "coinbase"
    title: ClassVar[str] = "Coinbase Advanced Trade"
    proven_for: ClassVar[frozenset[Capability]] = frozenset({"plan", "snapshot", "execute"})
    protection: ClassVar[Protection] = "ioc_limit"
    sandbox: ClassVar[bool | None] = False
    client_id_rule: ClassVar[str] = "the key as it is: 36 characters (Coinbase takes up to 128)"
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^.{1,128}$", re.S)
    settle_rule: ClassVar[str] = "signed-request (JWT) lifetime + 2 s: 120 s, or options.jwtLifetime"
    fee_source: ClassVar[FeeSource] = "fetchTradingFees"
    lot_rule: ClassVar[str] = (
        "lot: base_increment; min size: base_min_size; min notional: quote_min_size; tick: price_increment"
    )
    ccxt_options: ClassVar[Mapping[str, Any]] = {"fetchBalance": "v3PrivateGetBrokerageAccounts"}
    duplicate_id: ClassVar[re.Pattern[str] | None] = None  # a repeated id is answered with its order
    filter_failure: ClassVar[re.Pattern[str] | None] = re.compile(
        r"PREVIEW_INVALID_(BASE|QUOTE)_SIZE_(TOO_SMALL|TOO_LARGE|PRECISION)|PREVIEW_INVALID_(SIZE|PRICE)_PRECISION"
        r"|INVALID_(SIZE|PRICE)_PRECISION|INVALID_LIMIT_PRICE|PREVIEW_INVALID_LIMIT_PRICE|PREVIEW_INVALID_PRICE_TOO_LARGE"
    )
    auth_refusal: ClassVar[re.Pattern[str] | None] = re.compile(r"PERMISSION_DENIED|UNAUTHENTICATED|401 Unauthorized")
    transient: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"error\":\s*\"(DEADLINE_EXCEEDED|INTERNAL|UNAVAILABLE|UNKNOWN)\"|internal_server_error"
    )

    def order_params(self, client_order_id: str) -> dict[str, Any]:
        return {"client_order_id": client_order_id, "timeInForce": "IOC"}

    def create(
        self, venue: Venue, market: str, side: str, amount: str, price: str, client_order_id: str
    ) -> Mapping[str, Any]:
        placed = super().create(venue, market, side, amount, price, client_order_id)
        order_id = placed.get("id")
        if not order_id:
            return placed
        try:
            full: Mapping[str, Any] = venue.call("fetch_order", lambda: venue.client.fetch_order(order_id, market))
        except ExchangeError:
            # the order exists; a failed read-back must not pass for a refusal of it: answer what the create
            # said (no status: not final), and the executor settles it by a lookup of the key
            return placed
        return _exact(full)

    def lookup(self, venue: Venue, market: str, client_order_id: str) -> Mapping[str, Any] | None:
        client = venue.client
        info = client.market(market)
        params: dict[str, Any] = {"product_ids": [info["id"]], "limit": PAGE}
        key = self.key_of(client_order_id)
        with contextlib.suppress(ValueError):  # not one of our UUIDv7 keys: search the product's whole history
            params["start_date"] = client.iso8601(key_time_ms(key or "") - LOOKBACK_MS)
        while True:
            list_orders = functools.partial(client.v3PrivateGetBrokerageOrdersHistoricalBatch, dict(params))
            page: Mapping[str, Any] = venue.call("fetch_orders", list_orders)
            for raw in page.get("orders") or []:
                if raw.get("client_order_id") == client_order_id:
                    return _exact(client.parse_order(raw, info))
            cursor = page.get("cursor")
            if not page.get("has_next") or not cursor:
                return None
            params["cursor"] = cursor

    def cancel(self, venue: Venue, market: str, client_order_id: str) -> None:
        order = self.lookup(venue, market, client_order_id)
        if order is None:
            raise OrderNotFoundError(f"coinbase knows no order {client_order_id} on {market}")
        if order.get("status") in FINAL:
            return
        venue.call("cancel_order", lambda: venue.client.cancel_order(order["id"], market))

    def order_trades(self, venue: Venue, market: str, order_id: str) -> list[Mapping[str, Any]] | None:
        trades = venue.call(
            "fetch_my_trades", lambda: venue.client.fetch_my_trades(market, None, None, {"order_ids": [order_id]})
        )
        return [t for t in trades or [] if str(t.get("order")) == order_id]

    def prepare(self, client: Any) -> None:
        lifetime = token_lifetime(client.options or {})
        if lifetime < JWT_LIFETIME_S:
            client.create_auth_token = functools.partial(_token, client, lifetime)

    def settle_window(self, options: Mapping[str, Any]) -> float:
        return token_lifetime(options) + CLOCK_SKEW_S


def _exact(order: Mapping[str, Any]) -> Mapping[str, Any]:
    """The order with Coinbase's own `filled_value` as its cost: ccxt multiplies the filled size by the
    average price, which Coinbase rounds, so its product can miss the quote actually paid in the last digits."""
    value = (order.get("info") or {}).get("filled_value")
    return {**order, "cost": value} if value not in (None, "") else order


def token_lifetime(options: Mapping[str, Any]) -> int:
    """Seconds a signed request stays valid: `options.jwtLifetime`, else Coinbase's (and ccxt's) 120."""
    raw = options.get(LIFETIME_OPTION, JWT_LIFETIME_S)
    try:
        lifetime = int(raw)
    except (TypeError, ValueError):
        raise InputError(f"exchange.options.{LIFETIME_OPTION} must be whole seconds, not {raw!r}") from None
    if not 1 <= lifetime <= JWT_LIFETIME_S:
        raise InputError(f"exchange.options.{LIFETIME_OPTION} must be 1 to {JWT_LIFETIME_S} seconds, not {lifetime}")
    return lifetime


def _token(
    client: Any, lifetime: int, seconds: int, method: str | None = None, url: str | None = None, useEddsa: bool = False
) -> str:
    """ccxt 4.5's `coinbase.create_auth_token` with `exp` = `nbf` + `lifetime` instead of + 120: the same
    claims (CDP API key authentication), signed by ccxt's own `jwt`."""
    request: dict[str, Any] = {
        "aud": ["cdp_service" if useEddsa else "retail_rest_api_proxy"],
        "iss": "cdp" if useEddsa else "coinbase-cloud",
        "nbf": seconds,
        "exp": seconds + lifetime,
        "sub": client.apiKey,
        "iat": seconds,
    }
    if url is not None:
        uri = f"{method} {url.replace('https://', '')}".split("?", 1)[0]
        request["uris" if useEddsa else "uri"] = [uri] if useEddsa else uri
    head = {"kid": client.apiKey, "nonce": client.random_bytes(16)}
    if useEddsa:
        seed = client.array_slice(client.base64_to_binary(client.secret), 0, 32)
        token: str = client.jwt(request, seed, "sha256", False, {**head, "alg": "EdDSA"})
    else:
        token = client.jwt(request, client.encode(client.secret), "sha256", False, {**head, "alg": "ES256"})
    return token


COINBASE = CoinbaseProfile()
