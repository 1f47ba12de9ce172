"""Binance spot: proven for plan, snapshot and execute against `rebalancer_cli.testing.binance`.

* Client order id: `newClientOrderId` takes `^[.A-Z:/a-z0-9_-]{1,36}$`, so the 36-character dashed UUIDv7
  key goes as it is. ccxt maps the unified `clientOrderId` to it on create, and to `origClientOrderId` on
  fetch and cancel, so the unified calls serve.
* Duplicate ids: refused with -2010 "Duplicate order sent." only while the first order is OPEN; a filled
  IOC order frees its id (the executor looks an order up before it ever sends the same key again).
* Protected order: LIMIT with timeInForce=IOC at the worst acceptable price, quantity in base units.
* Settle window: a signed request is refused once `recvWindow` (ccxt sends its option, 10 s by default)
  has passed since its timestamp; one second more covers the clock skew Binance tolerates (1 s ahead).
* Errors: -2014 / -2015 / -1022 are key refusals whatever ccxt's class (ccxt raises -2015 as DDoSProtection
  once a private call of the same client succeeded); "Filter failure: NOTIONAL" comes as BadRequest, not
  InvalidOrder; -1001 (internal error, HTTP 503) comes as OperationFailed and is transient.
* Fees: `fetchTradingFees` (/sapi/v1/asset/tradeFee), the account's own rates per market. Lot size from
  LOT_SIZE (ccxt precision.amount), min notional from NOTIONAL (limits.cost.min).
* Sandbox: ccxt's testnet URLs (testnet.binance.vision), keys from that testnet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from ..base import Protection
from .base import Capability, ExchangeProfile, FeeSource, Venue


class BinanceProfile(ExchangeProfile):
    id: ClassVar[str] = "binance"
    title: ClassVar[str] = "Binance spot"
    proven_for: ClassVar[frozenset[Capability]] = frozenset({"plan", "snapshot", "execute"})
    protection: ClassVar[Protection] = "ioc_limit"
    sandbox: ClassVar[bool | None] = True
    client_id_rule: ClassVar[str] = "the key as it is: 36 characters, inside ^[.A-Z:/a-z0-9_-]{1,36}$"
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")
    settle_rule: ClassVar[str] = "recvWindow + 1 s (ccxt's option, 10 s by default)"
    fee_source: ClassVar[FeeSource] = "fetchTradingFees"
    lot_rule: ClassVar[str] = "lot: LOT_SIZE stepSize; min notional: NOTIONAL minNotional"
    duplicate_id: ClassVar[re.Pattern[str] | None] = re.compile(r"duplicate order sent", re.I)
    filter_failure: ClassVar[re.Pattern[str] | None] = re.compile(
        r"filter failure|MIN_NOTIONAL|NOTIONAL|LOT_SIZE|PRICE_FILTER|MARKET_LOT_SIZE", re.I
    )
    # -2014 malformed key, -2015 revoked key / IP / permissions, -1022 bad signature
    auth_refusal: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"code\":\s*-(2014|2015|1022)\b|Invalid API-key|API-key format invalid|Signature for this request", re.I
    )
    # -1001 "Internal error; unable to process your request. Please try again." and -1007 backend timeout
    transient: ClassVar[re.Pattern[str] | None] = re.compile(r"\"code\":\s*-(1001|1007)\b")

    def settle_window(self, options: Mapping[str, Any]) -> float:
        return float(options.get("recvWindow", 10_000)) / 1000 + 1.0

    def order_trades(self, venue: Venue, market: str, order_id: str) -> list[Mapping[str, Any]] | None:
        trades = venue.call(
            "fetch_my_trades", lambda: venue.client.fetch_my_trades(market, None, None, {"orderId": order_id})
        )
        return [t for t in trades or [] if str(t.get("order")) == order_id]


BINANCE = BinanceProfile()
