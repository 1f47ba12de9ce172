"""The yardstick policies are judged by: the certainty-equivalent loss against the costless target portfolio.

    L(gamma) = cost / (years * mean value) + (gamma / 2) * TE^2        (per year; reported in basis points)

with TE the annualized tracking error against the portfolio kept at target for free, and gamma the investor's
relative risk aversion. For a mean-variance investor, the second term is what the extra variance of the held
portfolio is worth in return per year, so the sum is the return per year the investor would give up to hold
the target instead: cost and risk in one unit (Leland 2000, "Optimal portfolio implementation with
transactions costs and capital gains taxes"; Sun, Fan, Chen, Schouwenaars & Albota 2006, "Optimal
rebalancing for institutional portfolios"; the objective of Boyd et al. 2017, "Multi-Period Trading via
Convex Optimization", which cvxportfolio implements). "Lowest cost at a tracking error no worse than X" can only
pick rules that trade as much as X; L trades one against the other at a stated price.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from ..decimals import RISK_AVERSION_RANGE
from ..errors import InputError

BP = Decimal(10_000)
# beside the config's own gamma the backtest shows a patient and a nervous investor
SIDE_RISK_AVERSIONS = (Decimal(1), Decimal(20))
MIN_RISK_AVERSION, MAX_RISK_AVERSION = (Decimal(x) for x in RISK_AVERSION_RANGE)


@dataclass(frozen=True, slots=True)
class Loss:
    """L(gamma) in basis points per year, with its two parts."""

    risk_aversion: Decimal
    cost_bp: Decimal  # cost / (years * mean value)
    tracking_bp: Decimal  # (gamma / 2) * TE^2

    @property
    def total_bp(self) -> Decimal:
        return self.cost_bp + self.tracking_bp


def certainty_equivalent_loss(
    *, total_cost: Decimal, years: Decimal, mean_value: Decimal, tracking_error: Decimal, risk_aversion: Decimal
) -> Loss:
    cost_rate = total_cost / (years * mean_value) if years > 0 and mean_value > 0 else Decimal(0)
    tracking = risk_aversion / 2 * tracking_error * tracking_error
    return Loss(risk_aversion, cost_rate * BP, tracking * BP)


def parse_risk_aversion(text: str, *, flag: str = "--risk-aversion") -> Decimal:
    """A risk aversion from the command line, in the config's range; one-line InputError otherwise."""
    from decimal import InvalidOperation

    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or not MIN_RISK_AVERSION <= value <= MAX_RISK_AVERSION:
        raise InputError(f"{flag} {text!r}: must be a number between {MIN_RISK_AVERSION} and {MAX_RISK_AVERSION}")
    return value
