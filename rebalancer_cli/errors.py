"""The project's one exception hierarchy.

Every error a user can cause or meet carries its exit code (README's table), so that `cli.py` maps an
exception to an exit status in one place and never prints a traceback for a known failure. ccxt's
exceptions never leave `exchange/ccxt_exchange.py`: they are mapped there into the classes below.
"""

from __future__ import annotations

from dataclasses import dataclass


class ExitCode:
    """Exit codes (README, "Exit codes"); scripts and cron wrappers rely on them."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    UNREACHABLE = 3
    INCOMPLETE = 4
    REFUSED = 5
    BUSY = 6
    BAD_FILL = 7
    PLAN_HAS_TRADES = 10
    INTERRUPTED = 130  # SIGINT (Ctrl-C), 128 + 2, as shells report it
    TERMINATED = 143  # SIGTERM, 128 + 15


class RebalanceError(Exception):
    """Base of every error this tool raises on purpose."""

    exit_code: int = ExitCode.INTERNAL


# --- bad input (exit 2) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One located problem in an input file; a file may have many, and all are reported at once."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def render(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where} {self.path}: {self.message}" if self.path else f"{where} {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"line": self.line, "column": self.column, "path": self.path, "message": self.message}


class InputError(RebalanceError):
    """Bad usage or bad input: a flag, a config, a snapshot, a prices file."""

    exit_code = ExitCode.USAGE


class InvalidFileError(InputError):
    """A file that failed validation, with every problem found in it (not only the first)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.render() for p in problems))


class ConfigError(InvalidFileError):
    """The config file is invalid."""


class SnapshotError(InvalidFileError):
    """The snapshot file is invalid."""


class PricesError(InvalidFileError):
    """The prices file of a backtest is invalid."""


class PlanningError(InputError):
    """Config and snapshot do not fit together (a missing market, a portfolio worth nothing)."""


class CredentialsError(InputError):
    """Credentials are missing or were refused; retrying cannot help, the operator must act."""


class UnprovenExchangeError(InputError):
    """The exchange's profile is not proven for what was asked (execute, reconcile): nothing was sent."""


class SandboxUnavailableError(InputError):
    """`exchange.sandbox: true` on an exchange without testnet or demo URLs."""


# --- unreachable services (exit 3) ------------------------------------------------------------


class ServiceUnavailableError(RebalanceError):
    """An exchange or a store could not be reached; nothing was traded."""

    exit_code = ExitCode.UNREACHABLE


class StoreError(ServiceUnavailableError):
    """The shadow ledger or the audit store failed or is not reachable."""


class ExchangeError(ServiceUnavailableError):
    """Base of every exchange failure, after mapping at the exchange boundary."""

    retryable: bool = False


class RetryableExchangeError(ExchangeError):
    """Transient: the same request may succeed later (network, timeout, 5xx, rate limit)."""

    retryable = True


class ExchangeNetworkError(RetryableExchangeError):
    """The request did not get a clear answer; for an order, its outcome is unknown."""


class ExchangeTimeoutError(ExchangeNetworkError):
    """The request timed out; for an order, the exchange may or may not have accepted it."""


class ExchangeUnavailableError(RetryableExchangeError):
    """The exchange answered that it is down or in maintenance."""


class RateLimitedError(RetryableExchangeError):
    """The exchange refused for rate; `retry_after` seconds is its own hint when it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NonRetryableExchangeError(ExchangeError):
    """The exchange refused the request on its merits; repeating it would be refused again."""


class InsufficientFundsError(NonRetryableExchangeError):
    """The account does not hold what the order needs."""


class InvalidOrderError(NonRetryableExchangeError):
    """The order breaks a market rule (lot size, min notional, price filter)."""


class BadSymbolError(NonRetryableExchangeError):
    """The market does not exist on this exchange."""


class ExchangeAuthError(NonRetryableExchangeError):
    """Credentials refused or lacking permission; exit 2 because the operator must fix them."""

    exit_code = ExitCode.USAGE


class OrderAlreadyPlacedError(NonRetryableExchangeError):
    """The exchange already knows this client order id: look the order up, never count it failed."""


class OrderNotFoundError(NonRetryableExchangeError):
    """The exchange does not know the order asked for."""


class CircuitOpenError(ExchangeError):
    """The circuit breaker is open after consecutive failures; calls are refused until it half-opens."""


# --- execution outcomes -----------------------------------------------------------------------


class ExecutionIncompleteError(RebalanceError):
    """Some orders failed; ledger and audit are consistent with what did happen."""

    exit_code = ExitCode.INCOMPLETE


class RefusedError(RebalanceError):
    """A guard or the kill switch refused to act."""

    exit_code = ExitCode.REFUSED


class HaltedError(RefusedError):
    """The kill switch is set for this portfolio."""


class SendRefusedError(RefusedError):
    """The ledger refused to let an order leave right before its request (kill switch pulled, or its lock was
    taken back by a successor's recovery): nothing was sent."""


class LedgerLostError(RefusedError):
    """The shadow ledger came back without the portfolio's state (a store restarted empty): it refuses to
    trade until `reconcile --repair` rebuilds it from the exchange and the audit trail."""


class PortfolioBusyError(RebalanceError):
    """Another writer (an `execute`, a `reconcile --repair`, a daemon) holds the portfolio's lease."""

    exit_code = ExitCode.BUSY

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLostError(StoreError):
    """This instance no longer holds the portfolio's lease; its writes are fenced off."""
