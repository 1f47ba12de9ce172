"""Exchange profiles: what differs per exchange (see `base.py`), one module each, registered here.

Adding an exchange: `profiles/<id>.py` with its profile, and one line in `PROFILES`.
"""

from __future__ import annotations

from typing import Any

from ...config import Config
from ...errors import UnprovenExchangeError
from .base import CAPABILITIES, GENERIC, Capability, ExchangeProfile
from .binance import BINANCE
from .bybit import BYBIT
from .coinbase import COINBASE
from .kraken import KRAKEN
from .okx import OKX

# ccxt exchange id -> its profile; an id not listed here gets GENERIC (plan and snapshot only)
PROFILES: dict[str, ExchangeProfile] = {
    "binance": BINANCE,
    "okx": OKX,
    "bybit": BYBIT,
    "coinbase": COINBASE,
    "kraken": KRAKEN,
}

__all__ = [
    "CAPABILITIES",
    "COLUMNS",
    "GENERIC",
    "PROFILES",
    "Capability",
    "ExchangeProfile",
    "UnprovenExchangeError",
    "describe_profiles",
    "display_rows",
    "markdown_table",
    "profile_for",
    "require_proven",
]


def profile_for(exchange_id: str) -> ExchangeProfile:
    return PROFILES.get(exchange_id, GENERIC)


def require_proven(config: Config, capability: Capability) -> None:
    """Refuse `capability` on an exchange whose profile the contract suite does not prove for it; the paper
    exchange is always allowed (it is local). Plan and snapshot are allowed everywhere."""
    exchange_id = config.exchange.id
    if config.exchange.is_paper or capability in ("plan", "snapshot"):
        return
    profile = profile_for(exchange_id)
    if capability not in profile.proven_for:
        proven = ", ".join(sorted(i for i, p in PROFILES.items() if capability in p.proven_for))
        raise UnprovenExchangeError(
            f"{capability} on {exchange_id} is refused: no profile proven for it (proven: {proven}); "
            f"plan and snapshot work, see `rebalance exchanges`"
        )


def describe_profiles() -> list[dict[str, Any]]:
    """Every registered profile, then the generic one: what `rebalance exchanges` shows."""
    return [*(PROFILES[i].describe() for i in sorted(PROFILES)), GENERIC.describe()]


COLUMNS = ("exchange", "proven for", "execute", "protection", "client order id", "settle window", "sandbox")


def display_rows() -> list[tuple[str, ...]]:
    """`describe_profiles` as text cells under `COLUMNS`, for the terminal table and the README's."""
    out: list[tuple[str, ...]] = []
    for row in describe_profiles():
        sandbox = row["sandbox"] if isinstance(row["sandbox"], str) else ("yes" if row["sandbox"] else "no")
        out.append(
            (
                f"{row['id']} ({row['title']})",
                ", ".join(row["proven"]) or "nothing (plan, snapshot allowed)",
                "yes" if "execute" in row["allowed"] else "refused (exit 2)",
                row["protection"],
                row["client_order_id"],
                row["settle_window"],
                sandbox,
            )
        )
    return out


def markdown_table() -> str:
    """The README's table of exchanges: the same cells as `rebalance exchanges`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in display_rows()]
    return "\n".join(lines) + "\n"
