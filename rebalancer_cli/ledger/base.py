"""The shadow ledger contract, shared by every backend.

The ledger exists so that two orders (from two threads, processes or daemon instances) can never spend the
same funds: funds are locked atomically before an order leaves, committed when the exchange acknowledges a
fill and released when the order fails. Backends differ in where the state lives, never in behaviour; the
contract test suite runs the same assertions against each of them.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol, runtime_checkable

# What `begin_send` found: the order may leave, or why it may not.
SendCheck = Literal["ok", "halted", "unlocked"]

# Fencing tokens must fit a signed 64-bit integer: SQLite stores them as INTEGER, Redis compares them exactly.
MAX_FENCE = 2**63 - 1

# Big enough for any real amount (1e15 with 18 decimals needs 34 digits, above Decimal's default 28), and
# trapping Inexact turns a silent rounding of money into a loud error instead.
EXACT = decimal.Context(
    prec=1000,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow, decimal.DivisionByZero],
)


@dataclass(frozen=True)
class Lock:
    """Funds set aside for one order until it is committed, released, or `expires_at` (unix seconds)."""

    key: str
    asset: str
    amount: Decimal
    expires_at: float


@dataclass(frozen=True)
class Commit:
    """One order's fill for `commit_many`: what it took out of the holdings and what it put in."""

    key: str
    debit: Mapping[str, Decimal]
    credit: Mapping[str, Decimal]


@dataclass(frozen=True)
class Halt:
    """The kill switch of a portfolio: who pulled it, when, and why (shown to every instance)."""

    reason: str
    by: str
    at: datetime


@runtime_checkable
class ShadowLedger(Protocol):
    """Holdings, locks and the cross-instance state of portfolios (fence, kill switch, planner memory)."""

    def sync_balances(
        self,
        portfolio_id: str,
        balances: Mapping[str, Decimal],
        *,
        fence: int | None = None,
        unless_locked: bool = False,
    ) -> bool:
        """Replace holdings with the exchange's truth; locks stay, since their orders are still in flight.

        `unless_locked`: only when no live lock exists, checked in the same atomic step (an order in flight has
        moved funds the exchange's balances may or may not show yet). True when the holdings were replaced."""
        ...

    def balances(self, portfolio_id: str) -> dict[str, Decimal]: ...

    def available(self, portfolio_id: str, asset: str) -> Decimal:
        """Holdings minus live locks: what a new order may still spend."""
        ...

    def lock(
        self,
        portfolio_id: str,
        key: str,
        asset: str,
        amount: Decimal,
        *,
        ttl_seconds: float,
        fence: int | None = None,
    ) -> bool:
        """Atomically set `amount` aside under `key`; True if granted or already granted/committed."""
        ...

    def lock_many(
        self,
        portfolio_id: str,
        requests: Sequence[tuple[str, str, Decimal]],
        *,
        ttl_seconds: float,
        fence: int | None = None,
    ) -> list[bool]:
        """`lock` for each (key, asset, amount), in order, in one atomic step (one round trip for a group of
        orders): each request sees the ones granted before it; one answer per request, as `lock` gives it."""
        ...

    def commit(
        self,
        portfolio_id: str,
        key: str,
        *,
        debit: Mapping[str, Decimal],
        credit: Mapping[str, Decimal],
        fence: int | None = None,
    ) -> bool:
        """Apply a fill and drop its lock; False when `key` was committed before (nothing changes)."""
        ...

    def commit_many(
        self,
        portfolio_id: str,
        commits: Sequence[Commit],
        *,
        fence: int | None = None,
        memory: str | None = None,
    ) -> list[bool]:
        """`commit` for each, in order, in one atomic step (one round trip for a group of orders' fills); one
        answer per commit, as `commit` gives it. A bad one refuses them all before anything is written.
        `memory`: the planner's memory after these fills, stored in the same step (`set_memory`)."""
        ...

    def release(self, portfolio_id: str, key: str, *, fence: int | None = None) -> None: ...

    def locks(self, portfolio_id: str) -> list[Lock]: ...

    def is_committed(self, portfolio_id: str, key: str) -> bool: ...

    def begin_send(
        self, portfolio_id: str, key: str, *, fence: int | None, at: datetime | None = None
    ) -> tuple[SendCheck, str]:
        """The last step before an order leaves, atomic: the sender's token is still the newest (else
        LeaseLostError), the kill switch is off (`halted`, with its reason) and the order's lock is still live
        (`unlocked`: recovery by a successor took it back). Only `ok` lets the request go, and `ok` also
        records, in the same step, that the order is leaving at `at` (the sender's clock, default now; what
        `sent_at` returns): a successor that takes the lease after
        this check finds the mark and waits out the exchange's window before calling the order absent. One
        durable write for both, where a separate "sent" write to the audit store would cost a round trip more
        per order."""
        ...

    def begin_send_many(
        self, portfolio_id: str, keys: Sequence[str], *, fence: int | None, at: datetime | None = None
    ) -> list[tuple[SendCheck, str]]:
        """`begin_send` for each key in one atomic step (the orders of one group leaving side by side): one
        answer per key, as `begin_send` gives it; the fence is checked once for all (LeaseLostError)."""
        ...

    def sent_at(self, portfolio_id: str, key: str) -> datetime | None:
        """When `begin_send` let `key` go (None: it never did, or its lock was committed or released since)."""
        ...

    def epoch(self, portfolio_id: str, fresh: str) -> tuple[str, bool]:
        """The epoch of this portfolio's ledger state, adopting `fresh` when there is none yet; True when it
        was created by this call (an empty ledger, or one that lost its state)."""
        ...

    def advance_fence(self, portfolio_id: str, token: int) -> None:
        """Announce the lease holder's token; writes carrying an older one raise LeaseLostError from now."""
        ...

    def halt(self, portfolio_id: str, reason: str, by: str) -> None: ...

    def resume(self, portfolio_id: str) -> None: ...

    def halted(self, portfolio_id: str) -> Halt | None: ...

    def get_memory(self, portfolio_id: str) -> str | None: ...

    def halt_and_memory(self, portfolio_id: str) -> tuple[Halt | None, str | None]:
        """`halted` and `get_memory` in one round trip: what every cycle reads first."""
        ...

    def set_memory(self, portfolio_id: str, value: str, *, fence: int | None = None) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


# --- argument checks shared by the backends, so that both refuse exactly the same inputs ---------------


def amount_text(value: Decimal, what: str = "amount") -> str:
    """Canonical text of an exact amount: what both backends store, so equal amounts are equal strings.

    Floats are refused: a binary float is never the amount the exchange reported.
    """
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        raise TypeError(f"{what} must be a Decimal, not {type(value).__name__}")
    d = Decimal(value)
    if not d.is_finite():
        raise ValueError(f"{what} must be finite, got {d}")
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def check_portfolio(portfolio_id: str) -> None:
    if not isinstance(portfolio_id, str) or not portfolio_id:
        raise ValueError("portfolio_id must be a non-empty string")


_CONTROL = re.compile(r"[\x00-\x1f]")


def check_name(value: str, what: str) -> None:
    """Asset names and keys are stored in line-separated records, hence no control characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters: {value!r}")


def check_fence(fence: int | None) -> None:
    if fence is None:
        return
    if isinstance(fence, bool) or not isinstance(fence, int) or not 0 <= fence <= MAX_FENCE:
        raise ValueError(f"fencing token must be an integer in 0..{MAX_FENCE}, got {fence!r}")


# A lock outliving this is a bug in the caller, and bounding it keeps expiry times exact in every backend.
MAX_TTL_SECONDS = 365 * 24 * 3600.0


def check_ttl(ttl_seconds: float) -> None:
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, (int, float))
        or not 0 < ttl_seconds <= MAX_TTL_SECONDS
    ):
        raise ValueError(f"ttl_seconds must be in (0, {MAX_TTL_SECONDS:.0f}], got {ttl_seconds!r}")


def lock_amount_text(amount: Decimal) -> str:
    text = amount_text(amount)
    if Decimal(text) <= 0:
        raise ValueError(f"lock amount must be positive, got {amount}")
    return text


def lock_requests(requests: Sequence[tuple[str, str, Decimal]]) -> list[tuple[str, str, str]]:
    """`lock_many`'s (key, asset, amount) requests checked, amounts as canonical text; a bad one refuses all."""
    out = []
    for key, asset, amount in requests:
        check_name(key, "key")
        check_name(asset, "asset")
        out.append((key, asset, lock_amount_text(amount)))
    return out


def commit_requests(commits: Sequence[Commit]) -> list[tuple[str, list[tuple[str, str]], list[tuple[str, str]]]]:
    """`commit_many`'s commits checked: (key, debits, credits) as canonical text; a bad one refuses all."""
    out = []
    for c in commits:
        check_name(c.key, "key")
        out.append((c.key, movements("debit", c.debit), movements("credit", c.credit)))
    return out


def movements(side: str, values: Mapping[str, Decimal]) -> list[tuple[str, str]]:
    """Validated (asset, canonical amount) pairs of one side of a fill; fills never move negative amounts."""
    out: list[tuple[str, str]] = []
    for asset, amount in values.items():
        check_name(asset, "asset")
        text = amount_text(amount, f"{side}[{asset}]")
        if text.startswith("-"):
            raise ValueError(f"{side}[{asset}] must not be negative, got {amount}")
        out.append((asset, text))
    return out
