"""Any exchange ccxt supports, behind the project's exchange protocol. The only module that imports ccxt.

This adapter names no exchange: what differs between exchanges (client order ids, the calls by client id,
the protected order's parameters, the settle window, the exchange's own error codes, where fees and market
rules come from) is asked of the exchange's profile (`exchange/profiles/`).

Everything that crosses this boundary is converted: ccxt is built with `number=str` and its strings become
`Decimal` here; ccxt's exceptions become the project's own (retryable or not), with credentials and signed
query strings scrubbed from their text. Requests are paced by our token bucket (ccxt's own throttle is
replaced by it, so ccxt's per-endpoint costs are what we count), retried with backoff when transient, and
cut off by a circuit breaker when the exchange is unhealthy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
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

from ..concurrency import side_by_side
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
    SandboxUnavailableError,
    UnprovenExchangeError,
)
from ..fsutil import atomic_write_text
from ..planner import PlannerState, needs_book
from ..snapshot import Level, Market, Snapshot
from . import ccxt_module
from .accounts import Accounts, account_id, api_url, max_cost
from .base import FillInfo, OrderResult, Protection, Side, fees_by_currency
from .breaker import CircuitBreaker
from .feed import MarketFeed
from .profiles import ExchangeProfile, profile_for
from .ratelimit import Prepaid, RateLimiter
from .retry import RetryPolicy, call_with_retry

ccxt = ccxt_module.load()  # the base, errors and constants; an exchange's module when its class is used

T = TypeVar("T")
ZERO = Decimal(0)
_WIDE = decimal.Context(prec=80, Emax=999, Emin=-999)
_ONE = Decimal(1)
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
# Exchange numbers beyond these are refused as the exchange's error, never computed with: a Decimal of 10^28
# or more leaves the 28 digits of the default context (quantize raises, sums round), and no price, amount or
# balance of a real market is near either bound.
MAX_MAGNITUDE = 28  # |x| < 10^28
MIN_MAGNITUDE = -40  # |x| >= 10^-40 unless 0
MAX_DIGITS = 40


def to_decimal(value: Any, what: str = "value") -> Decimal | None:
    """A ccxt number (a string with number=str) as a Decimal; None stays None; junk is an exchange error.

    Trailing zeros are dropped (Binance writes "0.00001000"): the value is the same, and a plan or a saved
    snapshot then reads exactly as one planned from a snapshot file, so the two can be compared as text.
    NaN, infinities and numbers outside 10^-40..10^28 (or of more than 40 digits) are refused with an
    ExchangeError naming `what`."""
    if value is None or value == "":
        return None
    text = value if type(value) is str else str(value)
    if len(text) <= MAX_DIGITS and _PLAIN.fullmatch(text) is not None:
        # plain digits (most of a book; Binance pads them to 8 decimals): without the fraction's trailing zeros
        # the text's Decimal is canonical already, and string work is cheaper than normalize + quantize
        d = Decimal(text.rstrip("0").rstrip(".") if "." in text else text)
        if d and not MIN_MAGNITUDE <= d.adjusted() < MAX_MAGNITUDE:
            raise ExchangeError(f"exchange sent a {what} out of range: {text[:40]!r}")
        return d
    if len(text) > 200:
        raise ExchangeError(f"exchange sent a {what} that is not a usable number: {text[:40]!r}...")
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ExchangeError(f"exchange sent a {what} that is not a number: {text[:40]!r}") from None
    if not d.is_finite():
        raise ExchangeError(f"exchange sent a non-finite {what}: {text[:40]!r}")
    if d and not MIN_MAGNITUDE <= d.adjusted() < MAX_MAGNITUDE:
        raise ExchangeError(f"exchange sent a {what} out of range: {text[:40]!r}")
    # a text of at most MAX_DIGITS characters cannot hold more digits (a book's thousands of numbers are)
    if (
        len(text) > MAX_DIGITS
        and len(d.as_tuple().digits) > MAX_DIGITS
        and len(d.normalize(_WIDE).as_tuple().digits) > MAX_DIGITS
    ):
        raise ExchangeError(f"exchange sent a {what} with more than {MAX_DIGITS} digits: {text[:40]!r}")
    if _PLAIN.fullmatch(text) is not None:
        return Decimal(text.rstrip("0").rstrip(".")) if "." in text else d
    return canonical(d)


# Digits, with a fractional part or not, and no exponent
_PLAIN = re.compile(r"-?[0-9]+(?:\.[0-9]*)?")


def canonical(d: Decimal) -> Decimal:
    """The same value without trailing zeros, and never in exponent form (1E+2 reads as a typo)."""
    n = d.normalize(_WIDE)
    # an exponent above 0 only where the value is a whole number that ended in zeros
    return n.quantize(_ONE, context=_WIDE) if n.adjusted() > 0 and n.as_tuple().exponent > 0 else n  # type: ignore[operator]


def step_from_precision(value: Any, precision_mode: int, what: str) -> Decimal | None:
    """A ccxt market precision (a tick size, or a number of decimal places) as a step; None when unusable."""
    precision = to_decimal(value, what)
    if precision is None or precision <= 0:
        return None
    if precision_mode == ccxt.TICK_SIZE:
        return precision
    if precision_mode == ccxt.DECIMAL_PLACES and precision == precision.to_integral_value():
        return Decimal(1).scaleb(-int(precision))
    return None


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
        profile: ExchangeProfile | None = None,
    ) -> None:
        self.id = str(client.id)
        self.profile = profile or profile_for(self.id)
        self.protection: Protection = self.profile.protection
        self.client = client
        self.calls: Counter[str] = Counter()
        self.limiter = limiter if isinstance(limiter, Prepaid) else Prepaid(limiter)
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
        self.profile.prepare(client)
        # an order request older than the exchange's acceptance window is refused: after that, "unknown" is final
        self.settle_window = self.profile.settle_window(client.options or {})
        self._account_fees: dict[str, Decimal] | None = None
        self._fee_misses: set[str] = set()  # markets whose fee the exchange would not tell
        # ccxt calls throttle(cost) before every request when enableRateLimit is on: ours replaces it.
        client.enableRateLimit = True
        client.throttle = self._throttle
        self._hooks = threading.local()  # clients are shared by the daemon's worker threads
        # An order's request is signed with the time taken right before the executor's last checks (SENT made
        # durable, then the fence): however long this process then stalls (a GC pause, SIGSTOP), the exchange
        # refuses the request once its validity window has passed, so a successor that waited out the settle
        # window after the SENT mark can never be overtaken by it. ccxt reads time only through these three.
        self._frozen = threading.local()
        client.milliseconds = lambda: self._now_ns() // 1_000_000
        client.seconds = lambda: self._now_ns() // 1_000_000_000
        client.microseconds = lambda: self._now_ns() // 1_000
        # ccxt parses book levels with safe_float even with number=str; keep them exact, as Decimals
        # (ccxt only sorts them, which Decimals do correctly)
        client.parse_order_book_bid_ask = self._bid_ask
        client.parse_order_book_bids_asks = self._bids_asks

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
        klass = ccxt_module.exchange_class(ex.id)
        if klass is None:
            raise InputError(f"exchange.id {ex.id!r} is neither `paper` nor an exchange ccxt knows")
        credentials: dict[str, str] = {}
        for field, env_name in ex.credentials_env.items():
            value = os.environ.get(env_name, "")
            if not value:
                raise CredentialsError(f"credential {field} is missing: environment variable {env_name} is not set")
            credentials[field] = value
        options = {**_LEAN_OPTIONS, **profile_for(ex.id).ccxt_options, **ex.options}
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
        profile = profile_for(ex.id)
        if ex.sandbox:
            if not profile.has_sandbox(client.urls):
                raise SandboxUnavailableError(
                    f"exchange.sandbox: {ex.id} has no testnet or demo URLs (in ccxt or in its profile); "
                    "remove `sandbox: true`, or point exchange.api_url at a test server"
                )
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
            profile=profile,
        )

    def _bids_asks(self, bidasks: Any, price_key: Any = 0, amount_key: Any = 1, count_key: Any = 2) -> list[Any]:
        """A book side's levels as `_bid_ask` makes them, in one loop: a level of two texts at integer keys (most
        exchanges' `[price, amount, ...]`) is read directly, anything else through `_bid_ask` (ccxt's safe_string).
        A 100-level book has 200 numbers: the call per level was most of reading it."""
        out: list[Any] = []
        direct = type(price_key) is int and type(amount_key) is int
        for entry in self.client.to_array(bidasks):
            if direct and type(entry) is list and len(entry) > max(price_key, amount_key):
                price, amount = entry[price_key], entry[amount_key]
                if type(price) is str and type(amount) is str:
                    out.append([to_decimal(price, "book price"), to_decimal(amount, "book amount")])
                    continue
            out.append(self._bid_ask(entry, price_key, amount_key, count_key))
        return out

    def _bid_ask(self, bidask: Any, price_key: Any = 0, amount_key: Any = 1, count_key: Any = 2) -> list[Any]:
        price = to_decimal(self.client.safe_string(bidask, price_key), "book price")
        amount = to_decimal(self.client.safe_string(bidask, amount_key), "book amount")
        return [price, amount]

    # -- calling ccxt ---------------------------------------------------------------------------------

    def call(self, endpoint: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        """One ccxt call: paced, retried when transient (unless `retry=False`), guarded by the breaker, its
        exceptions mapped to ours. A number ccxt cannot parse (its own arithmetic on an exchange's junk)
        is the exchange's error, never a crash."""

        def once() -> T:
            self.calls[endpoint] += 1
            try:
                return fn()
            except ccxt.BaseError as exc:
                raise self._map(exc) from None
            except (ArithmeticError, ValueError, TypeError) as exc:
                raise ExchangeError(self._scrub(f"{self.id}: unusable answer to {endpoint}: {exc}")) from None

        def guarded() -> T:  # one attempt through the breaker: an open circuit stops the retries at once
            return self.breaker.call(once)

        if not retry:
            return guarded()
        return call_with_retry(guarded, policy=self.retry)

    def _scrub(self, text: str) -> str:
        # A secret is replaced where it appears as a token of its own; one of 16+ characters anywhere. Shorter
        # than 8 (a 1-character passphrase) it is not searched for: it would turn `https://www.okx.com/api`
        # into `https://www.okx.***om/***pi`, and no message could be read any more.
        for secret in self._secrets:
            if len(secret) >= 16:
                text = text.replace(secret, "***")
            elif len(secret) >= 8:
                text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
        text = re.sub(r"([?&](signature|apiKey|api_key|key|sign)=)[^&\s\"']+", r"\1***", text)
        return re.sub(r"\?[^\s\"']{200,}", "?...", text)[:500]

    def _map(self, exc: Exception) -> RebalanceError:
        """ccxt's exception classes into ours; the order of the checks matters (subclasses first)."""
        message = self._scrub(f"{self.id}: {type(exc).__name__}: {exc}")
        verdict = self.profile.classify(exc)
        if verdict == "auth":
            # whatever ccxt's class (a revoked key may come as DDoSProtection): retrying a dead key as a rate
            # limit would hammer the exchange
            return ExchangeAuthError(message)
        if verdict == "transient":
            return ExchangeUnavailableError(message)
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
        if isinstance(exc, ccxt.OperationFailed):
            # ccxt's "may succeed if retried" (an internal error of the exchange, a malformed answer): a read is
            # retried; an order's outcome is unknown and it is looked up, never re-sent blindly
            return ExchangeUnavailableError(message)
        if isinstance(exc, ccxt.InsufficientFunds):
            return InsufficientFundsError(message)
        if isinstance(exc, ccxt.OrderNotFound):
            return OrderNotFoundError(message)
        if isinstance(exc, ccxt.DuplicateOrderId) or (
            verdict == "duplicate" and isinstance(exc, ccxt.InvalidOrder | ccxt.BadRequest)
        ):
            return OrderAlreadyPlacedError(message)
        if isinstance(exc, ccxt.BadSymbol):
            return BadSymbolError(message)
        if isinstance(exc, ccxt.InvalidOrder):
            return InvalidOrderError(message)
        if verdict == "filter":
            # a market rule broken, reported as a bad request (Binance's NOTIONAL) or as a bare ExchangeError
            # (Coinbase's size rules: ccxt has no class for them)
            return InvalidOrderError(message)
        if isinstance(exc, ccxt.AuthenticationError | ccxt.PermissionDenied | ccxt.AccountSuspended):
            return ExchangeAuthError(message)
        if isinstance(exc, ccxt.ExchangeError):
            return NonRetryableExchangeError(message)
        return ExchangeError(message)

    def _retry_after(self) -> float | None:
        """The wait the exchange asked for, read the profile's way (`Retry-After`, or the exchange's own)."""
        headers = getattr(self.client, "last_response_headers", None) or {}
        seconds = self.profile.retry_after({str(k).lower(): str(v) for k, v in dict(headers).items()})
        return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None

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
            markets = self.call("load_markets", lambda: self.client.load_markets())
            self._cache_put("markets", {k: _jsonable(v) for k, v in markets.items()})
        self._markets_loaded = True

    def _market_info(self, symbol: str) -> dict[str, Any]:
        market = self.client.markets.get(symbol) if self.client.markets else None
        if market is None:
            raise BadSymbolError(f"{self.id} has no market {symbol}")
        return dict(market)

    def _amount_step(self, market: Mapping[str, Any]) -> Decimal:
        step = self.profile.amount_step(market, self.client.precisionMode)
        if step is None:
            raise ExchangeError(f"{self.id} gives no usable lot size for {market.get('symbol')}")
        return step

    def _price_step(self, market: Mapping[str, Any]) -> Decimal | None:
        return self.profile.price_step(market, self.client.precisionMode)

    def _taker_fee(self, symbol: str, market: Mapping[str, Any]) -> tuple[Decimal, str]:
        fees = self._fees(symbol)
        if symbol in fees:
            return fees[symbol], "account"
        if self._config_fee is not None:
            return self._config_fee, "config"
        default = to_decimal(market.get("taker"), "taker fee")
        if default is not None:
            return default, "default"
        raise ExchangeError(f"{self.id} reports no taker fee for {symbol}; set exchange.taker_fee in the config")

    def _fee_call(self, symbol: str) -> tuple[Callable[[], Any], bool] | None:
        """The call that reads the account's own fees, as the profile says the exchange reports them: all
        markets at once (fetchTradingFees), one market per call (fetchTradingFee: True), or none (config)."""
        source, has = self.profile.fee_source, self.client.has
        if not self.client.apiKey or source == "config":
            return None
        if source in ("fetchTradingFees", "auto") and has.get("fetchTradingFees"):
            return (lambda: self.call("fetch_trading_fees", lambda: self.client.fetch_trading_fees())), False
        if source in ("fetchTradingFee", "auto") and has.get("fetchTradingFee"):
            one = lambda: {symbol: self.call("fetch_trading_fee", lambda: self.client.fetch_trading_fee(symbol))}  # noqa: E731
            return one, True
        return None

    def _fees(self, symbol: str) -> dict[str, Decimal]:
        """The account's own taker fees where the exchange reports them (cached: they change rarely)."""
        if self._account_fees is None:
            cached = self._cache_get("fees", FEES_TTL)
            if cached is not None:
                self._account_fees = {k: Decimal(v) for k, v in cached.items()}
        read = self._fee_call(symbol)
        known = self._account_fees
        if known is not None and (read is None or not read[1] or symbol in known or symbol in self._fee_misses):
            return known
        fees: dict[str, Decimal] = dict(known or {})
        if read is not None:
            try:
                raw = read[0]()
                for market, entry in (raw or {}).items():
                    taker = to_decimal((entry or {}).get("taker"), "taker fee")
                    if taker is not None and taker >= 0:
                        fees[market] = taker
            except ExchangeAuthError:
                # a refused key is reported by the balance read that follows; remembering "no account fees"
                # for hours would outlive the fix of the key or its permissions
                self._account_fees = {}
                return self._account_fees
            except NonRetryableExchangeError:
                pass  # not supported for this account: fall back to config/defaults
            if symbol not in fees:
                self._fee_misses.add(symbol)
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
        candles = self.call("fetch_ohlcv", lambda: self.client.fetch_ohlcv(symbol, "1d", limit=VOLATILITY_DAYS + 1))
        closes = [to_decimal(c[4], "close") for c in candles or [] if len(c) > 4]
        vol = realized_volatility([c for c in closes if c is not None and c > 0])
        self._cache_put(name, str(vol) if vol is not None else "none")
        return vol

    # -- protocol -----------------------------------------------------------------------------------------

    def fetch_balances(self) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        raw = self.call("fetch_balance", lambda: self.client.fetch_balance())
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
            # one after the other, not side by side: a 429 on the first must be heard before the second is sent
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
                min_notional=self.profile.min_notional(info) or ZERO,
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
        # the books are independent requests: side by side, within the rate limit (their tokens in one grant)
        with self.limiter.batch(len(with_book)):
            books = side_by_side([functools.partial(self._book, s) for s in with_book])
        for s, (bids, asks) in zip(with_book, books, strict=True):
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
            raw = self.call("fetch_bids_asks", lambda: self.client.fetch_bids_asks(symbols))
        else:
            raw = self.call("fetch_tickers", lambda: self.client.fetch_tickers(symbols))
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
        raw = self.call("fetch_order_book", lambda: self.client.fetch_order_book(symbol, self._book_limit))
        sides = []
        price_what, amount_what = f"{symbol} price", f"{symbol} amount"
        for side in ("bids", "asks"):
            levels = []
            for entry in raw.get(side) or []:
                price, amount = entry[0], entry[1]
                # levels parsed by `_bid_ask` are checked Decimals already; anything else is checked here
                if type(price) is not Decimal:
                    price = _required(price, price_what)
                if type(amount) is not Decimal:
                    amount = _required(amount, amount_what)
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

    def batch(self, requests: int) -> contextlib.AbstractContextManager[None]:
        return self.limiter.batch(requests)

    def _now_ns(self) -> int:
        frozen: int | None = getattr(self._frozen, "ns", None)
        return frozen if frozen is not None else time.time_ns()

    def _throttle(self, cost: Any = None) -> None:
        """ccxt calls this right before each request: pace it, then run the caller's pre-send hook, if any.

        With a hook (an order), the clock the request is signed with stops here, before the hook runs."""
        self.limiter.acquire(float(cost) if cost else 1.0)
        hook = getattr(self._hooks, "before_send", None)
        if hook is not None:
            self._hooks.before_send = None
            self._frozen.ns = time.time_ns()
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

        An immediate-or-cancel limit at `worst_price` (what the book no longer holds at that price expires),
        or a market order where the profile's exchange has no IOC; sized in base units either way. Refused
        before anything is sent on an exchange whose profile is not proven for execution."""
        if "execute" not in self.profile.proven_for:
            raise UnprovenExchangeError(
                f"orders on {self.id} are refused: its profile is not proven for execute (see `rebalance exchanges`)"
            )
        self._ensure_markets()
        exchange_id = self.profile.client_order_id(client_order_id)
        self._hooks.before_send = before_send
        try:
            raw = self.profile.create(
                self, market, str(side), format(amount, "f"), format(worst_price, "f"), exchange_id
            )
        finally:
            self._hooks.before_send = None
            self._frozen.ns = None
        return self._order(raw, client_order_id, market)

    def fetch_order(self, market: str, client_order_id: str) -> OrderResult | None:
        self._ensure_markets()
        raw = self.profile.lookup(self, market, self.profile.client_order_id(client_order_id))
        if raw is None:
            return None
        result = self._order(raw, client_order_id, market)
        if result.filled and not result.fills and result.exchange_order_id:
            result = self._with_trades(result)
        return result

    def _with_trades(self, order: OrderResult) -> OrderResult:
        assert order.exchange_order_id is not None
        trades = self.profile.order_trades(self, order.market, order.exchange_order_id)
        fills = tuple(_fill(t) for t in trades or [])
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
        self.profile.cancel(self, market, self.profile.client_order_id(client_order_id))

    def close(self) -> None:
        session = getattr(self.client, "session", None)
        if session is not None:
            session.close()

    def _order(self, raw: Mapping[str, Any], client_order_id: str, market: str) -> OrderResult:
        """A ccxt order structure as ours; `client_order_id` is our key (the exchange knows it as the
        profile's client order id)."""
        if not raw:
            raise ExchangeError(f"{self.id} sent an empty order answer")
        returned_id = raw.get("clientOrderId")
        if returned_id and returned_id not in (client_order_id, self.profile.client_order_id(client_order_id)):
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
