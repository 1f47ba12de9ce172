"""What differs between exchanges, in one class per exchange (the pattern of freqtrade's per-exchange classes
and hummingbot's connector folders). The generic adapter (`ccxt_exchange.CcxtExchange`) names no exchange:
it asks its profile.

A profile answers, for one ccxt exchange id:

* `client_order_id(key)` / `key_of(client_order_id)`: the idempotency key (a 36-character dashed UUIDv7
  from `ids.py`) as the exchange's client order id, deterministic, reversible, inside the exchange's length
  and character rules with any prefix it requires; `client_id_rule` says it in words.
* `create` / `lookup` / `cancel`: the protected order and the calls by client order id. The defaults use
  ccxt's unified calls with `{"clientOrderId": ...}`; where ccxt does not map the id to the exchange's own
  parameter, a profile calls that exchange's endpoint through ccxt's implicit API methods instead
  (`client.privateGetV5OrderRealtime(...)`) and parses the answer with ccxt's own `parse_order`.
* `protection` and `order_params`: an immediate-or-cancel limit at the worst acceptable price, expressed
  the way the exchange takes it, sized in base units; `"market"` only where the exchange has no IOC.
* `settle_window(options)`: seconds after which an order request the exchange has not shown can no longer
  be accepted (Binance: `recvWindow`; OKX: its 30 s request validity), from the ccxt client's options.
* `classify(exc)`: the exchange's codes and texts for a duplicate id, a filter failure, a key refusal and
  a transient internal error, where ccxt's class alone does not say it.
* `fee_source`, `amount_step`, `price_step`, `min_notional`: where fees, lot size and min notional come from.
* `proven_for`: what the contract suite (tests/test_exchange_contract.py) proves against that exchange's
  emulator. `execute` is refused on a profile not proven for it (`require_proven`).
* `sandbox`: whether the exchange has testnet or demo URLs (ccxt `set_sandbox_mode`).

Adding an exchange: a module here with a subclass and its instance, and one line in `PROFILES`
(`profiles/__init__.py`), beside its emulator dialect (`rebalancer_cli/testing/`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from ...errors import OrderNotFoundError
from ..base import Protection

T = TypeVar("T")
Capability = Literal["plan", "snapshot", "execute"]
CAPABILITIES: tuple[Capability, ...] = ("plan", "snapshot", "execute")
FeeSource = Literal["fetchTradingFees", "fetchTradingFee", "config", "auto"]
# What `classify` can say about a ccxt exception, beyond its class
Verdict = Literal["auth", "duplicate", "filter", "transient"]


class Venue(Protocol):
    """What a profile may use of the adapter: the ccxt client, and `call`, which paces, retries (unless
    `retry=False`), guards with the circuit breaker and maps ccxt's exceptions to ours."""

    client: Any

    def call(self, endpoint: str, fn: Callable[[], T], *, retry: bool = True) -> T: ...


class ExchangeProfile:
    """The defaults: ccxt's unified calls, the key as the client order id. Unproven: plan and snapshot only."""

    id: ClassVar[str] = "generic"
    title: ClassVar[str] = "any other ccxt exchange"
    proven_for: ClassVar[frozenset[Capability]] = frozenset()
    protection: ClassVar[Protection] = "ioc_limit"
    sandbox: ClassVar[bool | None] = None  # None: whatever ccxt knows (a `test` entry in its urls)
    client_id_rule: ClassVar[str] = "the idempotency key as it is (36-character dashed UUID)"
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^[0-9a-f-]{36}$")  # what the exchange accepts
    settle_rule: ClassVar[str] = "60 s (unknown exchange: a conservative guess)"
    fee_source: ClassVar[FeeSource] = "auto"
    lot_rule: ClassVar[str] = "lot: ccxt precision.amount (else limits.amount.min); min notional: limits.cost.min"
    # codes and texts of the exchange's refusals (searched in ccxt's exception text)
    duplicate_id: ClassVar[re.Pattern[str] | None] = None
    filter_failure: ClassVar[re.Pattern[str] | None] = None
    auth_refusal: ClassVar[re.Pattern[str] | None] = None
    transient: ClassVar[re.Pattern[str] | None] = None

    # -- client order ids -------------------------------------------------------------------------------

    def client_order_id(self, key: str) -> str:
        return key

    def key_of(self, client_order_id: str) -> str | None:
        """The idempotency key a client order id was made from, None when it is none of ours."""
        return client_order_id

    # -- the order and the calls by client order id -------------------------------------------------------

    def order_params(self, client_order_id: str) -> dict[str, Any]:
        """Extra parameters of the protected order (ccxt unified names where ccxt maps them)."""
        if self.protection == "market":
            return {"clientOrderId": client_order_id}
        return {"clientOrderId": client_order_id, "timeInForce": "IOC"}

    def create(
        self, venue: Venue, market: str, side: str, amount: str, price: str, client_order_id: str
    ) -> Mapping[str, Any]:
        """Send the protected order once (never retried: after a timeout only a lookup can tell); a ccxt
        order structure back."""
        params = self.order_params(client_order_id)
        if self.protection == "market":
            call = lambda: venue.client.create_order(market, "market", side, amount, None, params)  # noqa: E731
        else:
            call = lambda: venue.client.create_order(market, "limit", side, amount, price, params)  # noqa: E731
        result: Mapping[str, Any] = venue.call("create_order", call, retry=False)
        return result

    def lookup(self, venue: Venue, market: str, client_order_id: str) -> Mapping[str, Any] | None:
        """The order with this client order id as a ccxt order structure, None when the exchange does not
        know it."""
        try:
            result: Mapping[str, Any] = venue.call(
                "fetch_order", lambda: venue.client.fetch_order(None, market, {"clientOrderId": client_order_id})
            )
        except OrderNotFoundError:
            return None
        return result

    def cancel(self, venue: Venue, market: str, client_order_id: str) -> None:
        venue.call("cancel_order", lambda: venue.client.cancel_order(None, market, {"clientOrderId": client_order_id}))

    def order_trades(self, venue: Venue, market: str, order_id: str) -> list[Mapping[str, Any]] | None:
        """The fills of an order, for an order answer that lists none; None when the exchange cannot tell."""
        client = venue.client
        if client.has.get("fetchOrderTrades"):
            trades = venue.call("fetch_order_trades", lambda: client.fetch_order_trades(order_id, market))
        elif client.has.get("fetchMyTrades"):
            trades = venue.call("fetch_my_trades", lambda: client.fetch_my_trades(market))
        else:
            return None
        return [t for t in trades or [] if str(t.get("order")) == order_id]

    # -- timing and errors ----------------------------------------------------------------------------------

    def settle_window(self, options: Mapping[str, Any]) -> float:
        """Seconds after a send beyond which the exchange can no longer accept that request."""
        return 60.0

    def classify(self, exc: Exception) -> Verdict | None:
        """What the exchange's own code or text says the exception is, where ccxt's class does not say it."""
        text = str(exc)
        if self.auth_refusal is not None and self.auth_refusal.search(text):
            return "auth"
        if self.duplicate_id is not None and self.duplicate_id.search(text):
            return "duplicate"
        if self.filter_failure is not None and self.filter_failure.search(text):
            return "filter"
        if self.transient is not None and self.transient.search(text):
            return "transient"
        return None

    # -- market rules -----------------------------------------------------------------------------------------

    def amount_step(self, market: Mapping[str, Any], precision_mode: int) -> Decimal | None:
        """The lot size; None when the market gives none (the adapter then refuses it)."""
        from ..ccxt_exchange import step_from_precision, to_decimal

        step = step_from_precision((market.get("precision") or {}).get("amount"), precision_mode, "amount precision")
        if step is not None:
            return step
        minimum = to_decimal(((market.get("limits") or {}).get("amount") or {}).get("min"), "min amount")
        return minimum if minimum and minimum > 0 else None

    def price_step(self, market: Mapping[str, Any], precision_mode: int) -> Decimal | None:
        from ..ccxt_exchange import step_from_precision

        return step_from_precision((market.get("precision") or {}).get("price"), precision_mode, "price precision")

    def min_notional(self, market: Mapping[str, Any]) -> Decimal | None:
        from ..ccxt_exchange import to_decimal

        return to_decimal(((market.get("limits") or {}).get("cost") or {}).get("min"), "min cost")

    # -- description ------------------------------------------------------------------------------------------

    def has_sandbox(self, urls: Mapping[str, Any] | None = None) -> bool:
        if self.sandbox is not None:
            return self.sandbox
        return bool((urls or {}).get("test"))

    def describe(self) -> dict[str, Any]:
        """One row of `rebalance exchanges`."""
        allowed = ["plan", "snapshot", *(["execute"] if "execute" in self.proven_for else [])]
        return {
            "id": self.id,
            "title": self.title,
            "proven": [c for c in CAPABILITIES if c in self.proven_for],
            "allowed": allowed,
            "protection": self.protection,
            "client_order_id": self.client_id_rule,
            "settle_window": self.settle_rule,
            "settle_window_seconds": self.settle_window({}),
            "sandbox": "ccxt decides" if self.sandbox is None else self.sandbox,
            "fees": self.fee_source,
            "market_rules": self.lot_rule,
        }


GENERIC = ExchangeProfile()
