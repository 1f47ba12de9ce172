"""Any exchange ccxt supports, behind the project's exchange protocol. The only module that imports ccxt.

Everything that crosses this boundary is converted: ccxt is built with `number=str` and its strings become
`Decimal` here; ccxt's exceptions become the project's own (retryable or not), with credentials and signed
query strings scrubbed from their text. Requests are paced by our token bucket (ccxt's own throttle is
replaced by it, so ccxt's per-endpoint costs are what we count), retried with backoff when transient, and
cut off by a circuit breaker when the exchange is unhealthy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ccxt

from ..config import Config
from ..errors import (
    BadSymbolError,
    CredentialsError,
    ExchangeAuthError,
    ExchangeError,
    ExchangeNetworkError,
    ExchangeTimeoutError,
    ExchangeUnavailableError,
    InputError,
    InsufficientFundsError,
    InvalidOrderError,
    NonRetryableExchangeError,
    OrderAlreadyPlacedError,
    OrderNotFoundError,
    RateLimitedError,
    RebalanceError,
)
from ..fsutil import atomic_write_text
from ..planner import PlannerState, needs_book
from ..snapshot import Level, Market, Snapshot
from .accounts import Accounts, account_id, api_url, max_cost
from .base import FillInfo, OrderResult, Protection, Side, fees_by_currency
from .breaker import CircuitBreaker
from .feed import MarketFeed
from .ratelimit import RateLimiter
from .retry import RetryPolicy, call_with_retry

T = TypeVar("T")
ZERO = Decimal(0)
MARKETS_TTL = 3600.0
VOLATILITY_TTL = 6 * 3600.0
FEES_TTL = 6 * 3600.0
VOLATILITY_DAYS = 30
BOOK_LIMIT = 100

# Options that keep ccxt from making calls a rebalancer never needs (currencies, margin pairs, server time);
# the config's `exchange.options` override them.
_LEAN_OPTIONS: dict[str, Any] = {
    "fetchMarkets": {"types": ["spot"]},
    "fetchCurrencies": False,
    "fetchMargins": False,
    "adjustForTimeDifference": False,
}
_FILTER_FAILURE = re.compile(r"filter failure|MIN_NOTIONAL|NOTIONAL|LOT_SIZE|PRICE_FILTER|MARKET_LOT_SIZE", re.I)
_DUPLICATE = re.compile(r"duplicate order", re.I)
# Binance's key/signature refusals (-2014, -2015, -1022). ccxt raises -2015 as DDoSProtection once a private
# call of the same client object has succeeded (it reads a revoked key as an IP ban); retrying it as a rate
# limit would hammer the exchange with a dead key, so the text decides, whatever the class.
_AUTH_REFUSAL = re.compile(
    r"\"code\":\s*-(2014|2015|1022)\b|Invalid API-key|API-key format invalid|Signature for this request", re.I
)


def to_decimal(value: Any, what: str = "value") -> Decimal | None:
    """A ccxt number (a string with number=str) as a Decimal; None stays None; junk is an exchange error.

    Trailing zeros are dropped (Binance writes "0.00001000"): the value is the same, and a plan or a saved
    snapshot then reads exactly as one planned from a snapshot file, so the two can be compared as text."""
    if value is None or value == "":
        return None
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ExchangeError(f"exchange sent a {what} that is not a number: {str(value)[:40]!r}") from None
    if not d.is_finite():
        raise ExchangeError(f"exchange sent a non-finite {what}: {value!r}")
    return canonical(d)


def canonical(d: Decimal) -> Decimal:
    """The same value without trailing zeros, and never in exponent form (1E+2 reads as a typo)."""
    n = d.normalize()
    return n.quantize(Decimal(1)) if n.as_tuple().exponent > 0 else n  # type: ignore[operator]


def _required(value: Any, what: str) -> Decimal:
    d = to_decimal(value, what)
    if d is None:
        raise ExchangeError(f"exchange answer lacks the {what}")
    return d


def rebase_urls(urls: Any, base: str) -> Any:
    """Point every REST URL at `base`, keeping each URL's path (so an emulator sees the real paths)."""
    target = urlsplit(base)
    if isinstance(urls, str):
        parts = urlsplit(urls)
        return parts._replace(scheme=target.scheme, netloc=target.netloc).geturl()
    if isinstance(urls, dict):
        return {k: rebase_urls(v, base) for k, v in urls.items()}
    return urls


class CcxtExchange:
    def __init__(
        self,
        client: Any,
        *,
        limiter: RateLimiter,
        breaker: CircuitBreaker,
        retry: RetryPolicy,
        cache_dir: Path | None = None,
        config_fee: Decimal | None = None,
        secrets: tuple[str, ...] = (),
        book_limit: int = BOOK_LIMIT,
    ) -> None:
        self.id = str(client.id)
        self.protection: Protection = "ioc_limit"
        self.client = client
        self.calls: Counter[str] = Counter()
        self.limiter = limiter
        self.breaker = breaker
        self.retry = retry
        self._cache_dir = cache_dir
        self._memo: dict[str, tuple[float, Any]] = {}  # cache entries read: (expires at, value)
        self._config_fee = config_fee
        self._secrets = tuple(s for s in secrets if s)
        self._book_limit = book_limit
        self._markets_loaded = False
        # ccxt logs every request with its headers (the API key) at debug level: format and scrub first
        client.logger = _ScrubbingLogger(self._scrub)
        # an order request older than the exchange's receive window is refused: after that, "unknown" is final
        self.settle_window = float(client.options.get("recvWindow", 10_000)) / 1000 + 1.0
        self._account_fees: dict[str, Decimal] | None = None
        # ccxt calls throttle(cost) before every request when enableRateLimit is on: ours replaces it.
        client.enableRateLimit = True
        client.throttle = self._throttle
        self._hooks = threading.local()  # clients are shared by the daemon's worker threads
        # ccxt parses book levels with safe_float even with number=str; keep them exact, as Decimals
        # (ccxt only sorts them, which Decimals do correctly)
        client.parse_order_book_bid_ask = self._bid_ask

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        limiter: RateLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy | None = None,
        accounts: Accounts | None = None,
    ) -> CcxtExchange:
        """A client for the config's account; its rate limiter and breaker are the account's, from `accounts`
        (the daemon passes its own, shared by all its cycles; default: built for this client alone). `limiter`
        and `breaker` override them (tests)."""
        ex = config.exchange
        klass = getattr(ccxt, ex.id, None)
        if ex.id not in ccxt.exchanges or klass is None:
            raise InputError(f"exchange.id {ex.id!r} is neither `paper` nor an exchange ccxt knows")
        credentials: dict[str, str] = {}
        for field, env_name in ex.credentials_env.items():
            value = os.environ.get(env_name, "")
            if not value:
                raise CredentialsError(f"credential {field} is missing: environment variable {env_name} is not set")
            credentials[field] = value
        options = {**_LEAN_OPTIONS, **ex.options}
        client = klass(
            {
                **credentials,
                "number": str,
                "enableRateLimit": True,
                "timeout": int(ex.timeout * 1000),
                "options": options,
            }
        )
        missing = sorted(
            f for f, needed in (client.requiredCredentials or {}).items() if needed and f not in credentials
        )
        if missing:
            # fail before any request: otherwise markets load and the first private call refuses, less clearly
            raise CredentialsError(
                f"{ex.id} needs the credential(s) {', '.join(missing)}: name the environment variables "
                "holding them in exchange.credentials_env"
            )
        if ex.sandbox:
            client.set_sandbox_mode(True)
        url = api_url(config)
        if url:
            client.urls["api"] = rebase_urls(client.urls["api"], url)
        if limiter is None or breaker is None:
            guards = (accounts or Accounts()).guards(config, client)
            limiter, breaker = limiter or guards.limiter, breaker or guards.breaker
        cache_dir = config.resolved_state_dir() / "cache" / f"{ex.id}-{account_id(config)}"
        return cls(
            client,
            limiter=limiter,
            breaker=breaker,
            retry=retry or RetryPolicy(),
            cache_dir=cache_dir,
            config_fee=ex.taker_fee,
            secrets=tuple(credentials.values()),
        )

    def _bid_ask(self, bidask: Any, price_key: Any = 0, amount_key: Any = 1, count_key: Any = 2) -> list[Any]:
        price = to_decimal(self.client.safe_string(bidask, price_key), "book price")
        amount = to_decimal(self.client.safe_string(bidask, amount_key), "book amount")
        return [price, amount]

    # -- calling ccxt ---------------------------------------------------------------------------------

    def _call(self, endpoint: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        def once() -> T:
            self.calls[endpoint] += 1
            try:
                return fn()
            except ccxt.BaseError as exc:
                raise self._map(exc) from None

        def guarded() -> T:  # one attempt through the breaker: an open circuit stops the retries at once
            return self.breaker.call(once)

        if not retry:
            return guarded()
        return call_with_retry(guarded, policy=self.retry)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = re.sub(r"([?&](signature|apiKey|api_key|key|sign)=)[^&\s\"']+", r"\1***", text)
        return re.sub(r"\?[^\s\"']{200,}", "?...", text)[:500]

    def _map(self, exc: Exception) -> RebalanceError:
        """ccxt's exception classes into ours; the order of the checks matters (subclasses first)."""
        message = self._scrub(f"{self.id}: {type(exc).__name__}: {exc}")
        if _AUTH_REFUSAL.search(str(exc)):
            return ExchangeAuthError(message)
        if isinstance(exc, ccxt.RateLimitExceeded | ccxt.DDoSProtection):
            retry_after = self._retry_after()
            if retry_after:
                self.limiter.penalize(retry_after)
            return RateLimitedError(message, retry_after=retry_after)
        if isinstance(exc, ccxt.RequestTimeout):
            return ExchangeTimeoutError(message)
        if isinstance(exc, ccxt.ExchangeNotAvailable | ccxt.OnMaintenance):
            return ExchangeUnavailableError(message)
        if isinstance(exc, ccxt.NetworkError):
            return ExchangeNetworkError(message)
        if isinstance(exc, ccxt.InsufficientFunds):
            return InsufficientFundsError(message)
        if isinstance(exc, ccxt.OrderNotFound):
            return OrderNotFoundError(message)
        if isinstance(exc, ccxt.InvalidOrder | ccxt.BadRequest) and _DUPLICATE.search(str(exc)):
            return OrderAlreadyPlacedError(message)
        if isinstance(exc, ccxt.BadSymbol):
            return BadSymbolError(message)
        if isinstance(exc, ccxt.InvalidOrder):
            return InvalidOrderError(message)
        if isinstance(exc, ccxt.BadRequest) and _FILTER_FAILURE.search(str(exc)):
            # Binance reports MIN_NOTIONAL / LOT_SIZE filter failures as BadRequest, not InvalidOrder
            return InvalidOrderError(message)
        if isinstance(exc, ccxt.AuthenticationError | ccxt.PermissionDenied | ccxt.AccountSuspended):
            return ExchangeAuthError(message)
        if isinstance(exc, ccxt.ExchangeError):
            return NonRetryableExchangeError(message)
        return ExchangeError(message)

    def _retry_after(self) -> float | None:
        headers = getattr(self.client, "last_response_headers", None) or {}
        for key, value in dict(headers).items():
            if key.lower() == "retry-after":
                try:
                    seconds = float(value)
                except (TypeError, ValueError):
                    return None
                return seconds if math.isfinite(seconds) and seconds >= 0 else None
        return None

    # -- caches -------------------------------------------------------------------------------------------

    def _cache_get(self, name: str, ttl: float) -> Any:
        """A cached value younger than `ttl`; kept in memory too until it expires (a daemon's client reads the
        same files every cycle: a stat and a JSON parse per market each time otherwise)."""
        if self._cache_dir is None:
            return None
        memo = self._memo.get(name)
        if memo is not None and time.time() < memo[0]:
            return memo[1]
        path = self._cache_dir / f"{name}.json"
        try:
            written = path.stat().st_mtime
            if time.time() - written > ttl:
                return None
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        self._memo[name] = (written + ttl, value)
        return value

    def _cache_put(self, name: str, value: Any) -> None:
        if self._cache_dir is None:
            return
        self._memo.pop(name, None)
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs calls
            atomic_write_text(self._cache_dir / f"{name}.json", json.dumps(value))

    # -- markets ------------------------------------------------------------------------------------------

    def _ensure_markets(self) -> None:
        if self._markets_loaded:
            return
        cached = self._cache_get("markets", MARKETS_TTL)
        if cached:
            self.client.set_markets(cached)
        else:
            markets = self._call("load_markets", lambda: self.client.load_markets())
            self._cache_put("markets", {k: _jsonable(v) for k, v in markets.items()})
        self._markets_loaded = True

    def _market_info(self, symbol: str) -> dict[str, Any]:
        market = self.client.markets.get(symbol) if self.client.markets else None
        if market is None:
            raise BadSymbolError(f"{self.id} has no market {symbol}")
        return dict(market)

    def _amount_step(self, market: Mapping[str, Any]) -> Decimal:
        precision = to_decimal((market.get("precision") or {}).get("amount"), "amount precision")
        if precision is not None and precision > 0:
            if self.client.precisionMode == ccxt.TICK_SIZE:
                return precision
            if self.client.precisionMode == ccxt.DECIMAL_PLACES and precision == precision.to_integral_value():
                return Decimal(1).scaleb(-int(precision))
        minimum = to_decimal(((market.get("limits") or {}).get("amount") or {}).get("min"), "min amount")
        if minimum and minimum > 0:
            return minimum
        raise ExchangeError(f"{self.id} gives no usable lot size for {market.get('symbol')}")

    def _price_step(self, market: Mapping[str, Any]) -> Decimal | None:
        precision = to_decimal((market.get("precision") or {}).get("price"), "price precision")
        if precision is None or precision <= 0:
            return None
        if self.client.precisionMode == ccxt.TICK_SIZE:
            return precision
        if self.client.precisionMode == ccxt.DECIMAL_PLACES and precision == precision.to_integral_value():
            return Decimal(1).scaleb(-int(precision))
        return None

    def _taker_fee(self, symbol: str, market: Mapping[str, Any]) -> tuple[Decimal, str]:
        fees = self._fees()
        if symbol in fees:
            return fees[symbol], "account"
        if self._config_fee is not None:
            return self._config_fee, "config"
        default = to_decimal(market.get("taker"), "taker fee")
        if default is not None:
            return default, "default"
        raise ExchangeError(f"{self.id} reports no taker fee for {symbol}; set exchange.taker_fee in the config")

    def _fees(self) -> dict[str, Decimal]:
        """The account's own taker fees where the exchange reports them (cached: they change rarely)."""
        if self._account_fees is not None:
            return self._account_fees
        cached = self._cache_get("fees", FEES_TTL)
        if cached is not None:
            self._account_fees = {k: Decimal(v) for k, v in cached.items()}
            return self._account_fees
        fees: dict[str, Decimal] = {}
        if self.client.has.get("fetchTradingFees") and self.client.apiKey:
            try:
                raw = self._call("fetch_trading_fees", lambda: self.client.fetch_trading_fees())
                for symbol, entry in (raw or {}).items():
                    taker = to_decimal((entry or {}).get("taker"), "taker fee")
                    if taker is not None and taker >= 0:
                        fees[symbol] = taker
            except ExchangeAuthError:
                # a refused key is reported by the balance read that follows; remembering "no account fees"
                # for hours would outlive the fix of the key or its permissions
                self._account_fees = {}
                return self._account_fees
            except NonRetryableExchangeError:
                fees = {}  # not supported for this account: fall back to config/defaults
        self._account_fees = fees
        self._cache_put("fees", {k: str(v) for k, v in fees.items()})
        return fees

    # -- volatility -------------------------------------------------------------------------------------

    def _volatility(self, symbol: str) -> Decimal | None:
        """Daily realized volatility from the last 30 daily candles, cached for hours (it moves slowly)."""
        name = "vol-" + re.sub(r"[^A-Za-z0-9]", "_", symbol)
        cached = self._cache_get(name, VOLATILITY_TTL)
        if cached is not None:
            return Decimal(cached) if cached != "none" else None
        if not self.client.has.get("fetchOHLCV"):
            return None
        candles = self._call("fetch_ohlcv", lambda: self.client.fetch_ohlcv(symbol, "1d", limit=VOLATILITY_DAYS + 1))
        closes = [to_decimal(c[4], "close") for c in candles or [] if len(c) > 4]
        vol = realized_volatility([c for c in closes if c is not None and c > 0])
        self._cache_put(name, str(vol) if vol is not None else "none")
        return vol

    # -- protocol -----------------------------------------------------------------------------------------

    def fetch_balances(self) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        raw = self._call("fetch_balance", lambda: self.client.fetch_balance())
        free: dict[str, Decimal] = {}
        locked: dict[str, Decimal] = {}
        for asset, amount in (raw.get("free") or {}).items():
            d = to_decimal(amount, f"{asset} balance")
            if d is not None:
                free[asset] = d
        for asset, amount in (raw.get("used") or {}).items():
            d = to_decimal(amount, f"{asset} locked balance")
            if d:
                locked[asset] = d
        for asset, d in [*free.items(), *locked.items()]:
            if d < 0:
                raise ExchangeError(f"{self.id} reports a negative {asset} balance ({d})")
        return free, locked

    def fetch_snapshot(
        self,
        config: Config,
        state: PlannerState | None = None,
        *,
        full_books: bool = False,
        feed: MarketFeed | None = None,
    ) -> Snapshot:
        """Balances (one call), best bid/ask of every market (one call), then full books only where the
        planner's cheap screen says a trade is possible; `full_books` reads every market's book, so that a
        saved snapshot replays any decision exactly. Slow-moving parts (markets, fees, volatility) come
        from the cache and are read before the clock starts, so they never widen the skew.

        With a `feed` the balances and the bid/ask come from the reads it shares between portfolios (at most one
        tick old; the snapshot's time is the older read's, its skew the reads' distance apart)."""
        quote = config.quote_symbol
        symbols = [f"{a.symbol}/{quote}" for a in config.assets if a.symbol != quote]
        self._ensure_markets()
        infos = {s: self._market_info(s) for s in symbols}
        vols = {s: self._volatility(s) for s in symbols}
        fees = {s: self._taker_fee(s, infos[s]) for s in symbols}
        started = time.monotonic()
        taken_at = datetime.now(UTC)
        if feed is None:
            free, locked = self.fetch_balances()
            tops = self._tops(symbols)
            spread = 0.0
        else:
            (free, locked), balances_at = feed.balances(account_id(config), self.fetch_balances)
            tops, tops_at = feed.tops(
                f"{self.id}|{api_url(config) or ''}", symbols, functools.partial(self._tops, lenient=True)
            )
            if any(s not in tops for s in symbols):
                tops = {**tops, **self._tops([s for s in symbols if s not in tops])}  # refused with its reason
            taken_at = datetime.fromtimestamp(min(balances_at, tops_at), UTC)
            spread = abs(balances_at - tops_at)
        markets: dict[str, Market] = {}
        for s in symbols:
            info = infos[s]
            fee, source = fees[s]
            bids, asks = tops[s]
            markets[s] = Market(
                symbol=s,
                base=info["base"],
                quote=info["quote"],
                taker_fee=fee,
                amount_step=self._amount_step(info),
                min_notional=to_decimal(((info.get("limits") or {}).get("cost") or {}).get("min"), "min cost") or ZERO,
                bids=bids,
                asks=asks,
                volatility=vols[s],
                fee_source=source,
                price_step=self._price_step(info),
            )
        assets = {a.symbol for a in config.assets}
        balances = {k: v for k, v in free.items() if k in assets}
        held = {k: v for k, v in locked.items() if k in assets}
        if full_books:
            with_book = list(symbols)
        else:
            provisional = Snapshot(taken_at=taken_at, balances=balances, markets=markets, locked=held)
            with_book = sorted(needs_book(config, provisional, state, now=taken_at))
        for s in with_book:
            bids, asks = self._book(s)
            markets[s] = dataclasses.replace(markets[s], bids=bids, asks=asks)
        return Snapshot(
            taken_at=taken_at,
            balances=balances,
            markets=markets,
            locked=held,
            skew_seconds=time.monotonic() - started + spread,
            source=f"{self.id}",
        )

    def _tops(
        self, symbols: list[str], *, lenient: bool = False
    ) -> dict[str, tuple[tuple[Level, ...], tuple[Level, ...]]]:
        """Best bid and ask of every market in ONE request. `lenient` leaves out a market without a usable quote
        instead of refusing them all (a shared read for many portfolios: each is refused for its own markets)."""
        if self.client.has.get("fetchBidsAsks"):
            raw = self._call("fetch_bids_asks", lambda: self.client.fetch_bids_asks(symbols))
        else:
            raw = self._call("fetch_tickers", lambda: self.client.fetch_tickers(symbols))
        out: dict[str, tuple[tuple[Level, ...], tuple[Level, ...]]] = {}
        for s in symbols:
            try:
                out[s] = self._top(s, (raw or {}).get(s))
            except ExchangeError:
                if not lenient:
                    raise
        return out

    def _top(self, s: str, t: Any) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        if not t:
            raise ExchangeError(f"{self.id} sent no bid/ask for {s}")
        bid, ask = to_decimal(t.get("bid"), f"{s} bid"), to_decimal(t.get("ask"), f"{s} ask")
        if bid is None or ask is None or bid <= 0 or ask <= 0:
            raise ExchangeError(f"{self.id} has no two-sided market for {s} (bid {bid}, ask {ask})")
        if bid >= ask:
            raise ExchangeError(f"{self.id} sent a crossed top of book for {s}: bid {bid} >= ask {ask}")
        bid_size = to_decimal(t.get("bidVolume"), f"{s} bid size") or Decimal("1e-18")
        ask_size = to_decimal(t.get("askVolume"), f"{s} ask size") or Decimal("1e-18")
        return ((bid, bid_size),), ((ask, ask_size),)

    def _book(self, symbol: str) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        raw = self._call("fetch_order_book", lambda: self.client.fetch_order_book(symbol, self._book_limit))
        sides = []
        for side in ("bids", "asks"):
            levels = []
            for entry in raw.get(side) or []:
                price, amount = _required(entry[0], f"{symbol} price"), _required(entry[1], f"{symbol} amount")
                if price > 0 and amount > 0:
                    levels.append((price, amount))
            sides.append(tuple(levels))
        bids, asks = sides
        if not bids or not asks:
            raise ExchangeError(f"{self.id} sent an empty side in the {symbol} book")
        # best first: bids strictly falling, asks strictly rising
        if any(b[0] >= a[0] for a, b in itertools.pairwise(bids)) or any(
            b[0] <= a[0] for a, b in itertools.pairwise(asks)
        ):
            raise ExchangeError(f"{self.id} sent an unsorted {symbol} book")
        if bids[0][0] >= asks[0][0]:
            raise ExchangeError(f"{self.id} sent a crossed {symbol} book: bid {bids[0][0]} >= ask {asks[0][0]}")
        return bids, asks

    def _throttle(self, cost: Any = None) -> None:
        """ccxt calls this right before each request: pace it, then run the caller's pre-send hook, if any."""
        self.limiter.acquire(float(cost) if cost else 1.0)
        hook = getattr(self._hooks, "before_send", None)
        if hook is not None:
            self._hooks.before_send = None
            hook()

    def create_order(
        self,
        market: str,
        side: Side,
        amount: Decimal,
        client_order_id: str,
        *,
        worst_price: Decimal,
        before_send: Callable[[], None] | None = None,
    ) -> OrderResult:
        """One attempt, never retried here: after a timeout only a lookup by client order id can tell.

        An immediate-or-cancel limit at `worst_price`: what the book no longer holds at that price expires."""
        self._ensure_markets()
        self._hooks.before_send = before_send
        try:
            raw = self._call(
                "create_order",
                lambda: self.client.create_order(
                    market,
                    "limit",
                    str(side),
                    format(amount, "f"),
                    format(worst_price, "f"),
                    {"clientOrderId": client_order_id, "timeInForce": "IOC"},
                ),
                retry=False,
            )
        finally:
            self._hooks.before_send = None
        return self._order(raw, client_order_id, market)

    def fetch_order(self, market: str, client_order_id: str) -> OrderResult | None:
        self._ensure_markets()
        try:
            raw = self._call(
                "fetch_order",
                lambda: self.client.fetch_order(None, market, {"clientOrderId": client_order_id}),
            )
        except OrderNotFoundError:
            return None
        result = self._order(raw, client_order_id, market)
        if result.filled and not result.fills and self.client.has.get("fetchMyTrades") and result.exchange_order_id:
            result = self._with_trades(result)
        return result

    def _with_trades(self, order: OrderResult) -> OrderResult:
        trades = self._call(
            "fetch_my_trades",
            lambda: self.client.fetch_my_trades(order.market, None, None, {"orderId": order.exchange_order_id}),
        )
        fills = tuple(_fill(t) for t in trades or [] if str(t.get("order")) == order.exchange_order_id)
        if not fills:
            return order
        fees = fees_by_currency(fills)
        return OrderResult(
            client_order_id=order.client_order_id,
            exchange_order_id=order.exchange_order_id,
            market=order.market,
            side=order.side,
            status=order.status,
            amount=order.amount,
            filled=order.filled,
            average=order.average,
            cost=order.cost,
            fees=fees or order.fees,
            fills=fills,
        )

    def cancel_order(self, market: str, client_order_id: str) -> None:
        self._ensure_markets()
        self._call(
            "cancel_order",
            lambda: self.client.cancel_order(None, market, {"clientOrderId": client_order_id}),
        )

    def close(self) -> None:
        session = getattr(self.client, "session", None)
        if session is not None:
            session.close()

    def _order(self, raw: Mapping[str, Any], client_order_id: str, market: str) -> OrderResult:
        if not raw:
            raise ExchangeError(f"{self.id} sent an empty order answer")
        returned_id = raw.get("clientOrderId")
        if returned_id and returned_id != client_order_id:
            raise ExchangeError(f"{self.id} answered for order {returned_id} when asked about {client_order_id}")
        filled = to_decimal(raw.get("filled"), "filled amount") or ZERO
        cost = to_decimal(raw.get("cost"), "order cost")
        average = to_decimal(raw.get("average"), "average price")
        if cost is None:
            cost = filled * average if average is not None else ZERO
        if average is None and filled:
            average = cost / filled
        fills = tuple(_fill(t) for t in raw.get("trades") or [])
        fees = fees_by_currency(fills)
        if not fills:
            for fee in raw.get("fees") or ([raw["fee"]] if raw.get("fee") else []):
                amount = to_decimal((fee or {}).get("cost"), "fee")
                currency = (fee or {}).get("currency")
                if amount is not None and currency:
                    fees[currency] = fees.get(currency, ZERO) + amount
        amount = to_decimal(raw.get("amount"), "order amount") or filled
        if filled < 0 or filled > amount:
            raise ExchangeError(f"{self.id} reports {filled} filled on an order of {amount}")
        return OrderResult(
            client_order_id=client_order_id,
            exchange_order_id=str(raw["id"]) if raw.get("id") is not None else None,
            market=raw.get("symbol") or market,
            side=str(raw.get("side") or ""),
            status=str(raw.get("status") or "open"),
            amount=amount,
            filled=filled,
            average=average,
            cost=cost,
            fees=fees,
            fills=fills,
        )


class _ScrubbingLogger:
    """Stands in for ccxt's logger: an application that turns on debug logging must not get our keys."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        self._scrub = scrub
        self._log = logging.getLogger("rebalancer_cli.exchange.wire")

    def _emit(self, level: int, msg: object, args: tuple[object, ...]) -> None:
        if self._log.isEnabledFor(level):
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):  # a log line must never break a request
                text = " ".join(map(str, (msg, *args)))
            self._log.log(level, "%s", self._scrub(text))

    def debug(self, msg: object, *args: object, **_: object) -> None:
        self._emit(logging.DEBUG, msg, args)

    def info(self, msg: object, *args: object, **_: object) -> None:
        self._emit(logging.INFO, msg, args)

    def warning(self, msg: object, *args: object, **_: object) -> None:
        self._emit(logging.WARNING, msg, args)

    def error(self, msg: object, *args: object, **_: object) -> None:
        self._emit(logging.ERROR, msg, args)


def _fill(t: Mapping[str, Any]) -> FillInfo:
    fee = t.get("fee") or {}
    ts = t.get("timestamp")
    return FillInfo(
        trade_id=str(t.get("id")),
        amount=_required(t.get("amount"), "fill amount"),
        price=_required(t.get("price"), "fill price"),
        fee=to_decimal(fee.get("cost"), "fill fee") or ZERO,
        fee_currency=str(fee.get("currency") or ""),
        at=datetime.fromtimestamp(int(ts) / 1000, UTC) if ts else datetime.now(UTC),
    )


def realized_volatility(closes: list[Decimal]) -> Decimal | None:
    """Standard deviation of daily log returns; floats are fine here: it is a statistic, not money."""
    if len(closes) < 3:
        return None
    rets = [math.log(float(b) / float(a)) for a, b in itertools.pairwise(closes)]
    mean = sum(rets) / len(rets)
    var = sum((r - mean) ** 2 for r in rets) / (len(rets) - 1)
    return Decimal(str(round(math.sqrt(var), 6)))


_max_cost = max_cost  # the name tests and benches know


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
