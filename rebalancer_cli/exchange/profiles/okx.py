"""OKX (API v5) spot: proven against `rebalancer_cli.testing.okx` (see `proven_for`).

* Client order id ("Place order", `clOrdId`): 1-32 case-sensitive letters and digits. The 36-character
  dashed UUIDv7 key is refused there (51000 "Parameter clOrdId error"), so the id is the key without its
  four dashes: 32 lowercase hex characters, deterministic, and the key again once the dashes go back at
  8-4-4-4-12. ccxt maps the unified `clientOrderId` to `clOrdId` on create (`create_order_request`),
  fetch (`GET /api/v5/trade/order`) and cancel (`POST /api/v5/trade/cancel-order`), so the unified
  calls serve; ccxt's own broker-prefixed id is only used when no id is given.
* Duplicate ids: 51016 "Client order ID already exists." only while the first order is LIVE; a filled or
  expired IOC order frees its id and the same id trades again. The exchange never protects a re-send:
  the executor looks the key up before it sends it again, and only after the settle window.
* Protected order: `ordType` ioc with `px` (ccxt: type limit, timeInForce IOC), `sz` in base units
  (`tgtCcy` base_ccy), `tdMode` cash: no "market buy needs a price" anywhere. The answer of "Place
  order" carries `ordId` and `sCode` only (no state, no fills), so `create` reads the order back by
  `clOrdId` at once; the fills of an order come from "Get transaction details" (`ordId`), and the
  order's cost is their sum (OKX reports only an average price).
* Settle window ("REST Authentication"): OKX refuses a request whose OK-ACCESS-TIMESTAMP is more than
  30 s from its clock, and honours it until then: an order request held in flight for 29 s still
  trades. 30 s plus 2 s for clock skew and transit. With `exchange.options.expTime` (milliseconds, at
  most 30000) every order request carries the `expTime` header ("Transaction timeouts"): the exchange
  discards it once that deadline passed (50036), and the window shrinks to expTime + 2 s.
* Errors: 51016 duplicate; 51020 (below `minSz`), 51121 (lot), 51000 (a parameter, e.g. `px` off the
  tick), 51006 / 51137 / 51138 (price limits) are filter failures; 501xx key, passphrase, signature,
  environment and IP refusals are key refusals whatever ccxt's class; 50001 / 50004 / 50013 / 50026 and
  51054 / 51149 ("Request / Order timed out", unknown to ccxt, which raises them as plain ExchangeError)
  are transient: a read is retried, an order's outcome is looked up, never assumed.
* Fees: `fetchTradingFee` (singular, `GET /api/v5/account/trade-fee?instType=SPOT&instId=...`, the
  account's own rate; ccxt has no plural call for OKX). Lot size `lotSz` (precision.amount), tick
  `tickSz`; OKX publishes a minimum size (`minSz`, limits.amount.min) and no minimum notional for spot:
  the min notional is none, and an order below `minSz` is refused by OKX as a filter failure.
* Sandbox: OKX demo trading has no URL of its own; ccxt's `set_sandbox_mode` sends `x-simulated-trading:
  1` to the same host, with keys created for demo trading (a live key is refused there: 50101).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from ...errors import InputError
from ..base import Protection
from .base import Capability, ExchangeProfile, FeeSource, Venue

VALIDITY_SECONDS = 30.0  # "REST Authentication": the timestamp may be at most 30 s from the server's clock
SKEW_SECONDS = 2.0
# ccxt's paths of the order endpoints that honour `expTime` (it signs `trade/batch-orders` by default)
_DEADLINE_PATHS = frozenset({"trade/batch-orders", "trade/order"})
_HEX_KEY = re.compile(r"^[0-9a-f]{32}$")


class OkxProfile(ExchangeProfile):
    id: ClassVar[str] = "okx"
    title: ClassVar[str] = "OKX spot, API v5"
    proven_for: ClassVar[frozenset[Capability]] = frozenset({"plan", "snapshot", "execute"})
    protection: ClassVar[Protection] = "ioc_limit"
    sandbox: ClassVar[bool | None] = True
    client_id_rule: ClassVar[str] = "the key without its dashes: 32 hex characters, inside ^[A-Za-z0-9]{1,32}$"
    client_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9]{1,32}$")
    settle_rule: ClassVar[str] = "30 s request validity + 2 s (options.expTime, ms, shortens it to expTime + 2 s)"
    fee_source: ClassVar[FeeSource] = "fetchTradingFee"
    lot_rule: ClassVar[str] = "lot: lotSz; min size: minSz (OKX refuses below it); min notional: none on OKX spot"
    duplicate_id: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"sCode\":\s*\"51016\"|Client order ID already exists|Duplicated clOrdId", re.I
    )
    filter_failure: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"s?[cC]ode\":\s*\"(51000|51006|51020|51121|51137|51138)\""
    )
    # 50101 environment, 50103-50107 missing headers / wrong passphrase, 50110 IP, 50111-50114 key, timestamp
    # format, signature, authorization, 50119 unknown key
    auth_refusal: ClassVar[re.Pattern[str] | None] = re.compile(r"\"s?[cC]ode\":\s*\"50(101|10[3-7]|11[0-4]|119)\"")
    transient: ClassVar[re.Pattern[str] | None] = re.compile(
        r"\"s?[cC]ode\":\s*\"(50001|50004|50013|50026|51054|51149)\""
    )

    # -- client order ids -------------------------------------------------------------------------------

    def client_order_id(self, key: str) -> str:
        return key.replace("-", "")

    def key_of(self, client_order_id: str) -> str | None:
        if not _HEX_KEY.match(client_order_id):
            return None
        c = client_order_id
        return f"{c[:8]}-{c[8:12]}-{c[12:16]}-{c[16:20]}-{c[20:]}"

    # -- the order and the calls by client order id -------------------------------------------------------

    def create(
        self, venue: Venue, market: str, side: str, amount: str, price: str, client_order_id: str
    ) -> Mapping[str, Any]:
        """The IOC limit once, then the order read back by `clOrdId`: OKX answers a placement with its ids
        only, and the executor needs the outcome (filled, the rest expired) from this one call."""
        _send_deadlines(venue.client)
        placed = super().create(venue, market, side, amount, price, client_order_id)
        found = self.lookup(venue, market, client_order_id)
        return found if found is not None else placed

    def lookup(self, venue: Venue, market: str, client_order_id: str) -> Mapping[str, Any] | None:
        """The order by `clOrdId` (the newest with that id), with its fills and their exact cost."""
        found = super().lookup(venue, market, client_order_id)
        if found is None or not found.get("id") or not Decimal(str(found.get("filled") or 0)):
            return found
        trades = self.order_trades(venue, market, str(found["id"]))
        if not trades:
            return found
        filled = sum((Decimal(str(t["amount"])) for t in trades), Decimal(0))
        if filled != Decimal(str(found["filled"])):
            return found  # the fills listed so far do not add up: keep OKX's own totals
        cost = sum((Decimal(str(t["price"])) * Decimal(str(t["amount"])) for t in trades), Decimal(0))
        return {**found, "trades": trades, "cost": format(cost, "f")}

    # -- timing -----------------------------------------------------------------------------------------------

    def settle_window(self, options: Mapping[str, Any]) -> float:
        deadline = _deadline_ms(options)
        window = VALIDITY_SECONDS if deadline is None else min(VALIDITY_SECONDS, deadline / 1000)
        return window + SKEW_SECONDS


def _deadline_ms(options: Mapping[str, Any]) -> int | None:
    raw = options.get("expTime")
    if raw is None:
        return None
    value = int(raw)
    if not 0 < value <= VALIDITY_SECONDS * 1000:
        raise InputError(f"okx options.expTime must be 1..30000 ms (a signed request is void after 30 s), not {raw}")
    return value


def _send_deadlines(client: Any) -> None:
    """With `options.expTime`, sign every order request with an `expTime` header of now + that many ms.

    ccxt has no parameter for the header, so its `sign` is wrapped (once per client): the header is added
    in the thread that signs, to that request only, when the timestamp is made."""
    deadline = _deadline_ms(client.options or {})
    if deadline is None or getattr(client, "_rebalance_deadlines", False):
        return
    sign = client.sign

    def signed(path: str, api: Any = "public", method: str = "GET", params: Any = None) -> Any:
        request = sign(path, api, method, {} if params is None else params)
        if method == "POST" and path in _DEADLINE_PATHS:
            expiry = int(time.time() * 1000) + deadline
            request["headers"] = {**(request.get("headers") or {}), "expTime": str(expiry)}
        return request

    client.sign = signed
    client._rebalance_deadlines = True


OKX = OkxProfile()
