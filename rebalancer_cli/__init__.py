"""rebalance: keeps portfolios at their target weights on real exchanges, safely and cheaply."""

__version__ = "0.1.0"
