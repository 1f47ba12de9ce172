"""Kraken spot (REST): proven for plan, snapshot and execute against `rebalancer_cli.testing.kraken`.

What differs on Kraken, and where it comes from (docs.kraken.com/api, "Spot REST"; ccxt 4.5 `kraken.py`):

* Client order id: `cl_ord_id` ("Spot Client Order Identifiers") takes a long UUID (36 characters with
  dashes), a short UUID (32 hex) or free text of at most 18 characters, so the 36-character dashed UUIDv7
  key goes as it is (and is its own key back). ccxt's unified `clientOrderId` maps to `cl_ord_id` on
  create, OpenOrders, ClosedOrders and CancelOrder, but NOT on `fetch_order`, which sends it as `userref`
  (an int32) beside the txid QueryOrders requires: a lookup by our key would never find the order. So the
  lookup asks OpenOrders, then ClosedOrders, filtered by `cl_ord_id` (unified `fetch_open_orders` /
  `fetch_closed_orders` with `clientOrderId`, which ccxt does map).
* Duplicate ids: Kraken "verifies cl_ord_id uniqueness across open orders" only. An immediate-or-cancel
  order is never open once answered, so a resent key trades again; nothing on the exchange protects it.
  What does is the executor's lookup before any resend, and `deadline` (below). The refusal of an id held
  by an open order (EOrder:Duplicate order; ccxt leaves it a plain ExchangeError) is mapped here.
* Protected order: `ordertype=limit`, `timeinforce=IOC` at the worst acceptable price, `volume` in base
  units, `oflags=fciq` (fee in the quote asset: ccxt's trade parser labels every trade fee with the quote,
  so a fee charged in base would be misread). The AddOrder answer carries no status and no fill, so
  `create` reads the order from ClosedOrders by `cl_ord_id` right after it is accepted.
* Settle window: Kraken has no receive window (its nonce need only grow), so an order held in flight could
  trade at any later time. Every AddOrder therefore carries `deadline` ("RFC3339 timestamp after which the
  matching engine should reject the new order request ... min now() + 2 seconds, max now() + 60
  seconds"): 10 s after it is built (ccxt option `deadlineSeconds`, 3 to 60, written in whole seconds and
  rounded down), so the request can no longer be accepted 10 s after it left; the settle window is that
  plus 1 s for clock skew. The deadline is set before ccxt's pacing wait, so the window counted from the
  send is never shorter than the deadline's. A request refused for its deadline (EService:Deadline
  elapsed) never reached the book: transient, looked up and sent again under the same key.
* Errors ccxt leaves generic: EAPI:Invalid signature (a key refusal, not an ExchangeError to report as a
  bug), EGeneral:Permission denied and EAuth:*; EOrder:Cost minimum not met, EOrder:Tick size check failed,
  EOrder:Invalid price, EOrder:Order minimum not met and EGeneral:Invalid arguments:volume (filter
  failures); EService:Deadline elapsed and "EService: Throttled" (transient). EAPI:Invalid nonce is ccxt's
  InvalidNonce, a network error: retried (a read) or looked up (an order).
* Fees: `fetchTradingFee` (TradeVolume with `pair`, one call per market, cached), the account's tier.
  Lot size: AssetPairs `lot_decimals` (ccxt precision.amount); minimum size `ordermin` (limits.amount.min)
  where it is a multiple of the lot, the step used instead so no order falls below it; min notional:
  `costmin` (limits.cost.min). Price tick: `pair_decimals` (ccxt precision.price).
* Pacing: ccxt paces Kraken for the Starter tier (rateLimit 1000 ms and a private call costing 3: one every
  3 s, Kraken's 0.33/s counter decay) and counts public calls (limited per IP on Kraken) in the same
  budget. On the Intermediate or Pro tier set `exchange.rate_limit_per_minute` to 90 or 180 (the contract
  suite runs as Pro). At Starter pace, a snapshot read right after a 429 (our bucket drained by its
  Retry-After) takes about 8 s, over the default `max_snapshot_skew` of 5 s: that execute is refused before
  anything is sent, and the next run proceeds.
* Sandbox: none for spot (ccxt's features say so; Kraken's demo environment is for futures only).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

from ...errors import ExchangeError, InvalidOrderError, NonRetryableExchangeError, OrderAlreadyPlacedError
from ..base import Protection
from .base import Capability, ExchangeProfile, FeeSource, Venue

DEADLINE_SECONDS = 10.0
SKEW_SECONDS = 1.0
_LONG_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_DUPLICATE = re.compile(r"EOrder:Duplicate", re.I)
_FILTER = re.compile(
    r"EOrder:(Cost minimum not met|Order minimum not met|Tick size check failed|Invalid price)"
    r"|EGeneral:Invalid arguments:volume"
)


def deadline_seconds(options: Mapping[str, Any]) -> float:
    """The AddOrder deadline's distance from now: the ccxt option `deadlineSeconds`, 3 to 60. Kraken takes
    now + 2 s to now + 60 s; the deadline is written in whole seconds, rounded down, so 3 s is the least
    that stays above 2 s."""
    try:
        seconds = float(options.get("deadlineSeconds", DEADLINE_SECONDS))
    except (TypeError, ValueError):
        seconds = DEADLINE_SECONDS
    return min(max(seconds, 3.0), 60.0)


class KrakenProfile(ExchangeProfile):
    id: ClassVar[str] = "kraken"
    title: ClassVar[str] = "Kraken spot REST"
    proven_for: ClassVar[frozenset[Capability]] = frozenset({"plan", "snapshot", "execute"})
    protection: ClassVar[Protection] = "ioc_limit"
    sandbox: ClassVar[bool | None] = False
    client_id_rule: ClassVar[str] = (
        "the key as it is: cl_ord_id takes a 36-character UUID; found via OpenOrders/ClosedOrders by cl_ord_id"
    )
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(
        rf"^({_LONG_UUID}|[0-9a-fA-F]{{32}}|[\x21-\x7e]{{1,18}})$"
    )
    settle_rule: ClassVar[str] = "AddOrder deadline (10 s, ccxt option deadlineSeconds, 3..60) + 1 s"
    fee_source: ClassVar[FeeSource] = "fetchTradingFee"
    lot_rule: ClassVar[str] = (
        "lot: AssetPairs lot_decimals (or ordermin where it is a multiple of the lot); "
        "min notional: costmin; tick: pair_decimals"
    )
    duplicate_id: ClassVar[re.Pattern[str] | None] = _DUPLICATE
    filter_failure: ClassVar[re.Pattern[str] | None] = _FILTER
    auth_refusal: ClassVar[re.Pattern[str] | None] = re.compile(
        r"EAPI:Invalid key|EAPI:Invalid signature|EGeneral:Permission denied|EAuth:|EAccount:Invalid permissions"
    )
    transient: ClassVar[re.Pattern[str] | None] = re.compile(r"EService:Deadline elapsed|EService: ?Throttled")

    # -- client order ids -------------------------------------------------------------------------------

    def key_of(self, client_order_id: str) -> str | None:
        return client_order_id if re.fullmatch(_LONG_UUID, client_order_id) else None

    # -- the order and the calls by client order id -------------------------------------------------------

    def order_params(self, client_order_id: str) -> dict[str, Any]:
        return {"clientOrderId": client_order_id, "timeInForce": "IOC", "oflags": "fciq"}

    def create(
        self, venue: Venue, market: str, side: str, amount: str, price: str, client_order_id: str
    ) -> Mapping[str, Any]:
        """AddOrder once, with its deadline; then the order as OpenOrders/ClosedOrders show it (the answer
        has neither status nor fill)."""
        client = venue.client
        # whole seconds, as in Kraken's example (2021-04-01T00:18:45Z), rounded down: never later than asked
        due = datetime.now(UTC) + timedelta(seconds=deadline_seconds(client.options or {}))
        params = {**self.order_params(client_order_id), "deadline": due.strftime("%Y-%m-%dT%H:%M:%SZ")}
        try:
            answer: Mapping[str, Any] = venue.call(
                "create_order",
                lambda: client.create_order(market, "limit", side, amount, price, params),
                retry=False,
            )
        except (OrderAlreadyPlacedError, InvalidOrderError):
            raise
        except NonRetryableExchangeError as exc:
            # ccxt raises these refusals as a plain ExchangeError; the executor needs to know which they are
            if _DUPLICATE.search(str(exc)):
                raise OrderAlreadyPlacedError(str(exc)) from None
            if _FILTER.search(str(exc)):
                raise InvalidOrderError(str(exc)) from None
            raise
        # closed only: an immediate-or-cancel order is closed once answered; one still open (or missed while
        # it closed) leaves the create answer, which the executor cancels and looks up again
        found = self._find(venue, client_order_id, ("fetch_closed_orders",))
        return found if found is not None else answer

    def lookup(self, venue: Venue, market: str, client_order_id: str) -> Mapping[str, Any] | None:
        """The order under this `cl_ord_id`: open ones, else closed ones. Open first: an order moves from
        open to closed, never back, so one that closes between the two calls is still seen by the second
        (closed first could miss it, and an order missed here is sent again)."""
        return self._find(venue, client_order_id, ("fetch_open_orders", "fetch_closed_orders"))

    def _find(self, venue: Venue, client_order_id: str, calls: tuple[str, ...]) -> Mapping[str, Any] | None:
        """The first of `calls` (ccxt's fetch_open_orders / fetch_closed_orders, filtered by cl_ord_id) that
        knows the order. An id Kraken let us use twice (it is unique among open orders only) is an error,
        never one of the two orders silently."""
        client = venue.client
        self._index_altnames(client)
        params = {"clientOrderId": client_order_id}
        found: list[Mapping[str, Any]] = []
        for name in calls:
            method: Callable[..., list[Mapping[str, Any]]] = getattr(client, name)
            answer = venue.call(name, functools.partial(method, None, None, None, params))
            found = [o for o in answer if o.get("clientOrderId") == client_order_id]
            if found:
                break
        if not found:
            return None
        if len(found) > 1:
            raise ExchangeError(
                f"kraken holds {len(found)} orders under client order id {client_order_id}: "
                f"{', '.join(str(o.get('id')) for o in found)}; settle them by hand"
            )
        order = dict(found[0])
        # ccxt recomputes cost as filled x average (Kraken's average is rounded to the pair's decimals);
        # Kraken's own `cost` is the exact quote amount of the fills
        exact = (order.get("info") or {}).get("cost")
        if exact is not None:
            order["cost"] = exact
        return order

    def cancel(self, venue: Venue, market: str, client_order_id: str) -> None:
        client = venue.client
        venue.call("cancel_order", lambda: client.cancel_order(None, market, {"clientOrderId": client_order_id}))

    def order_trades(self, venue: Venue, market: str, order_id: str) -> list[Mapping[str, Any]] | None:
        """QueryOrders with trades=true names the order's trade ids, QueryTrades gives them (TradesHistory
        would page through every trade of the account)."""
        client = venue.client
        answer = venue.call("query_orders", lambda: client.privatePostQueryOrders({"txid": order_id, "trades": True}))
        ids = list(((answer or {}).get("result") or {}).get(order_id, {}).get("trades") or [])
        if not ids:
            return []
        trades = venue.call(
            "fetch_order_trades", lambda: client.fetch_order_trades(order_id, market, None, None, {"trades": ids})
        )
        return [t for t in trades or [] if str(t.get("order")) == order_id]

    @staticmethod
    def _index_altnames(client: Any) -> None:
        """ccxt resolves an order's pair by its altname (XBTUSD) through an index it builds only when it
        fetches markets; markets restored from our cache leave it empty, and XXBTZUSD's orders would carry
        the symbol "XBTUSD"."""
        options = client.options
        if not options.get("marketsByAltname") and client.markets:
            options["marketsByAltname"] = {
                m["altname"]: m for m in client.markets.values() if isinstance(m, Mapping) and m.get("altname")
            }

    # -- timing -------------------------------------------------------------------------------------------

    def settle_window(self, options: Mapping[str, Any]) -> float:
        return deadline_seconds(options) + SKEW_SECONDS

    # -- market rules -------------------------------------------------------------------------------------

    def amount_step(self, market: Mapping[str, Any], precision_mode: int) -> Decimal | None:
        """The lot, or `ordermin` where it is a whole number of lots: then every size the planner picks is at
        least Kraken's minimum (the snapshot has no separate minimum size)."""
        from ..ccxt_exchange import to_decimal

        lot = super().amount_step(market, precision_mode)
        minimum = to_decimal(((market.get("limits") or {}).get("amount") or {}).get("min"), "min amount")
        if lot and minimum and minimum > lot and minimum % lot == 0:
            return minimum
        return lot


KRAKEN = KrakenProfile()
