"""An exchange account's guards, built in one place: the rate-limit bucket and the circuit breaker that every user
of the account shares (`plan`, `execute`, every daemon cycle of every portfolio on it).

An account is what the exchange counts requests against: the exchange, the API URL the client talks to and the
API key. Two configs naming the same key through different environment variables are one account; the key
itself is only ever hashed. With a Redis URL the bucket lives in Redis and is shared by every process and
instance on the account; without, each process keeps a local one (`share` of them splitting the budget).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Config
from .breaker import BreakerState, CircuitBreaker
from .ratelimit import RateLimiter, account_limiter, limit_per_minute_from_ccxt, rate_limit_key

logger = logging.getLogger("rebalance")
FAILURE_THRESHOLD = 5  # consecutive failures that open the circuit
RESET_SECONDS = 30.0  # how long an open circuit refuses before it lets one probe through


def api_url(config: Config) -> str | None:
    """The URL the client talks to: REBALANCE_EXCHANGE_API_URL (tests, proxies) over the config's `api_url`."""
    return os.environ.get("REBALANCE_EXCHANGE_API_URL") or config.exchange.api_url


def account_id(config: Config) -> str:
    """12 hex digits naming the account: exchange id, API URL and the API key's value, hashed."""
    ex = config.exchange
    key = os.environ.get(ex.credentials_env.get("apiKey", ""), "")
    return hashlib.sha256(f"{ex.id}|{api_url(config) or ''}|{key}".encode()).hexdigest()[:12]


def max_cost(client: Any) -> float:
    """The heaviest request we make, in ccxt's cost units, so that the bucket can always grant it.

    ccxt's costs for the calls a rebalancer makes stay below 50 on every exchange we know (Binance: depth at
    1000 levels costs 20); an exchange may declare more, in which case its own figure wins."""
    declared = [
        float(v) for v in (getattr(client, "rateLimitCosts", None) or {}).values() if isinstance(v, int | float)
    ]
    return max([50.0, *declared])


@dataclass(frozen=True)
class AccountGuards:
    account: str
    limiter: RateLimiter
    breaker: CircuitBreaker


class Accounts:
    """The guards of each account, built on first use and then shared; thread-safe.

    `execute` and `plan` build one for their single run; the daemon keeps one per process for all its cycles.
    `share`: how many processes split a local bucket's budget (a daemon's worker processes)."""

    def __init__(self, *, share: int = 1) -> None:
        self.share = max(1, share)
        self._guards: dict[str, AccountGuards] = {}
        self._lock = threading.Lock()

    def guards(self, config: Config, client: Any) -> AccountGuards:
        """`client`: the account's ccxt client, for its default rate limit and request costs."""
        account = account_id(config)
        with self._lock:
            found = self._guards.get(account)
            if found is None:
                found = self._guards[account] = self._build(config, client, account)
            return found

    def _build(self, config: Config, client: Any, account: str) -> AccountGuards:
        ex = config.exchange
        per_minute = (
            float(ex.rate_limit_per_minute)
            if ex.rate_limit_per_minute
            else limit_per_minute_from_ccxt(client.rateLimit)
        )
        redis_client = None
        if config.redis_url:
            from ..ledger.redis import connect  # redis only when configured

            redis_client = connect(config.redis_url)
        limiter = account_limiter(
            per_minute if redis_client is not None else per_minute / self.share,
            client=redis_client,
            key=rate_limit_key(ex.id, account) if redis_client is not None else None,
            max_cost=max_cost(client),
        )
        breaker = CircuitBreaker(
            ex.id,
            failure_threshold=FAILURE_THRESHOLD,
            reset_timeout=RESET_SECONDS,
            on_state_change=_log_change(ex.id),
        )
        return AccountGuards(account, limiter, breaker)


def _log_change(exchange_id: str) -> Callable[[BreakerState, BreakerState], None]:
    def on_change(_old: BreakerState, new: BreakerState) -> None:
        from ..telemetry import log

        log(logger, logging.WARNING, "circuit breaker", exchange=exchange_id, state=str(new))

    return on_change
