"""Bybit API v5, spot on a Unified Trading Account: proven against `rebalancer_cli.testing.bybit`.

After the v5 docs (https://bybit-exchange.github.io/docs/v5/) and ccxt 4.5's `bybit.py`:

* Client order id: `orderLinkId` takes "a max of 36 characters: numbers, letters (upper and lower case),
  dashes, and underscores" (Place Order), so the 36-character dashed UUIDv7 key goes as it is. ccxt maps
  the unified `clientOrderId` to `orderLinkId` on create only.
* Create: the answer is `{orderId, orderLinkId}` and nothing else ("the ack ... indicates that the request
  is successfully accepted"): no status, no fills. The profile looks the order up right after the ack and
  reports what the lookup says; ccxt's unified answer alone would read as an open order forever.
* Lookup and cancel by client id: ccxt's `fetch_order` refuses without `acknowledged` and never sends
  `orderLinkId`; `cancel_order` sends `clientOrderId`, which Bybit ignores. So the profile calls the
  endpoints itself through ccxt's implicit methods: `GET /v5/order/realtime` (open orders and a UTA
  account's 500 most recent closed ones, by `orderLinkId`), then `GET /v5/order/history` (7 days, all
  statuses) for an order the realtime list no longer keeps, and `POST /v5/order/cancel` with
  `orderLinkId`; answers are parsed by ccxt's own `parse_order`.
* Protected order: `orderType=Limit`, `timeInForce=IOC` at the worst acceptable price, `qty` in base
  units. (A spot market Buy is quote-sized on UTA unless `marketUnit=baseCoin`; no market order is sent.)
  A partly filled IOC closes as `PartiallyFilledCanceled`, which ccxt reads as "closed" with its fill.
* Settle window: a signed request is honoured while `server_time - recv_window <= timestamp <
  server_time + 1000` (v5 intro): `recvWindow` (ccxt's option, 5000 ms by default) plus that second.
* Errors (v5 "Error Codes", Spot Trade): 170141 "Duplicate clientOrderId" (12141 in some UTA answers, as
  ccxt's table records; 110072 on derivatives); 170134 / 170136 / 170137 / 170140 / 170148 market rules;
  10003 / 10004 / 10005 / 10007 / 10009 / 10010 / 33004 key refusals; 10000 / 10016 / 170001 / 170032 /
  170234 internal errors that may pass (ccxt raises 10016 as a plain ExchangeError, not retryable).
* Fees: `fetchTradingFee` (`GET /v5/account/fee-rate?category=spot&symbol=...`), one market per call;
  ccxt's `fetchTradingFees` refuses spot. Lot size: `lotSizeFilter.basePrecision` (ccxt precision.amount),
  minimum size `minOrderQty` (limits.amount.min), minimum notional `minOrderAmt` (limits.cost.min), tick
  `priceFilter.tickSize`.
* Rate limit: the wait is `X-Bapi-Limit-Reset-Timestamp` (Bybit sends no `Retry-After`).
* Sandbox: ccxt's testnet URLs (api-testnet.bybit.com), keys made on testnet.bybit.com.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from ..base import Protection
from .base import Capability, ExchangeProfile, FeeSource, Venue

# pauses between the lookups after an ack while the accepted order is not listed yet (1.5 s in all)
CREATE_LOOKUP_PAUSES = (0.1, 0.2, 0.4, 0.8)
RESET_MARGIN = 0.05  # seconds added to the wait until X-Bapi-Limit-Reset-Timestamp (clock and transit)
_KEY = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class BybitProfile(ExchangeProfile):
    id: ClassVar[str] = "bybit"
    title: ClassVar[str] = "Bybit v5 spot, unified trading account"
    proven_for: ClassVar[frozenset[Capability]] = frozenset({"plan", "snapshot", "execute"})
    protection: ClassVar[Protection] = "ioc_limit"
    sandbox: ClassVar[bool | None] = True
    client_id_rule: ClassVar[str] = "the key as it is (orderLinkId): 36 characters, inside ^[A-Za-z0-9_-]{1,36}$"
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9_-]{1,36}$")
    settle_rule: ClassVar[str] = "recv_window + 1 s (ccxt's recvWindow option, 5 s by default)"
    fee_source: ClassVar[FeeSource] = "fetchTradingFee"
    lot_rule: ClassVar[str] = (
        "lot: lotSizeFilter.basePrecision; min size: minOrderQty; min notional: minOrderAmt; tick: tickSize"
    )
    duplicate_id: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"retCode\":\s*(170141|12141|110072)\b|Duplicate clientOrderId|OrderLinkedID is duplicate", re.I
    )
    filter_failure: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"retCode\":\s*(170134|170135|170136|170137|170140|170148|12137)\b"
    )
    auth_refusal: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"retCode\":\s*(10003|10004|10005|10007|10009|10010|33004)\b"
    )
    transient: ClassVar[re.Pattern[str] | None] = re.compile(r"\"retCode\":\s*(10000|10016|170001|170032|170234)\b")

    def key_of(self, client_order_id: str) -> str | None:
        return client_order_id if _KEY.match(client_order_id) else None

    def create(
        self, venue: Venue, market: str, side: str, amount: str, price: str, client_order_id: str
    ) -> Mapping[str, Any]:
        """The IOC limit through ccxt's unified call (it maps `clientOrderId` to `orderLinkId`), then the
        lookup that tells its status and fills, asked again for a moment while the accepted order is not
        listed yet (Bybit creates orders asynchronously); past that the bare ack, which reads as open, so the
        executor cancels it and asks again."""
        ack = super().create(venue, market, side, amount, price, client_order_id)
        for pause in (*CREATE_LOOKUP_PAUSES, None):
            found = self.lookup(venue, market, client_order_id)
            if found is not None:
                return found
            if pause is not None:
                time.sleep(pause)
        return ack

    def lookup(self, venue: Venue, market: str, client_order_id: str) -> Mapping[str, Any] | None:
        client = venue.client
        request = {"category": "spot", "symbol": client.market(market)["id"], "orderLinkId": client_order_id}
        realtime = lambda: client.privateGetV5OrderRealtime(dict(request))  # noqa: E731
        history = lambda: client.privateGetV5OrderHistory(dict(request))  # noqa: E731
        for endpoint, read in (("fetch_order", realtime), ("fetch_order_history", history)):
            answer: Mapping[str, Any] = venue.call(endpoint, read)
            orders = ((answer or {}).get("result") or {}).get("list") or []
            if orders:  # newest first: the order this key placed (a key is never sent for two orders)
                parsed: Mapping[str, Any] = client.parse_order(orders[0], client.market(market))
                return parsed
        return None

    def cancel(self, venue: Venue, market: str, client_order_id: str) -> None:
        client = venue.client
        request = {"category": "spot", "symbol": client.market(market)["id"], "orderLinkId": client_order_id}
        venue.call("cancel_order", lambda: client.privatePostV5OrderCancel(request))

    def order_trades(self, venue: Venue, market: str, order_id: str) -> list[Mapping[str, Any]] | None:
        trades = venue.call(
            "fetch_my_trades", lambda: venue.client.fetch_my_trades(market, None, None, {"orderId": order_id})
        )
        return [t for t in trades or [] if str(t.get("order")) == order_id]

    def settle_window(self, options: Mapping[str, Any]) -> float:
        return float(options.get("recvWindow", 5000)) / 1000 + 1.0

    def retry_after(self, headers: Mapping[str, str]) -> float | None:
        """v5 "Rate Limit": a refused request (10006 "Too many visits!") carries `X-Bapi-Limit-Reset-Timestamp`,
        the millisecond at which the limit resets, and no `Retry-After`."""
        reset = headers.get("x-bapi-limit-reset-timestamp", "")
        if reset.isdigit():  # Bybit's clock: a little more, so that the next request lands after the reset
            return max(0.0, int(reset) / 1000 - time.time()) + RESET_MARGIN
        return super().retry_after(headers)


BYBIT = BybitProfile()
