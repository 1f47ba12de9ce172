"""Exchange profiles: what differs per exchange (see `base.py`), one module each, registered here.

Adding an exchange: `profiles/<id>.py` with its profile, and one line in `PROFILES`.
"""

from __future__ import annotations

from typing import Any

from ...config import Config
from ...errors import UnprovenExchangeError
from .base import CAPABILITIES, GENERIC, Capability, ExchangeProfile
from .binance import BINANCE
from .kraken import KRAKEN

# ccxt exchange id -> its profile; an id not listed here gets GENERIC (plan and snapshot only)
PROFILES: dict[str, ExchangeProfile] = {
    "binance": BINANCE,
    "kraken": KRAKEN,
}

__all__ = [
    "CAPABILITIES",
    "GENERIC",
    "PROFILES",
    "Capability",
    "ExchangeProfile",
    "UnprovenExchangeError",
    "describe_profiles",
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
