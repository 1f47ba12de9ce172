"""Exact decimal field types shared by the config and snapshot schemas.

Operators write numbers as YAML numbers or quoted strings; both arrive here as text or `Decimal` (never float,
see `yamlfile`). Range errors are phrased one way for every field ("must be between 0 and 1").
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema
from pydantic_core import PydanticCustomError

MAX_MAGNITUDE = Decimal("1e30")


def to_decimal(value: Any) -> Decimal:
    """Accept Decimal, int and decimal text; refuse floats and booleans, which are never exact money."""
    if isinstance(value, bool):
        raise PydanticCustomError("decimal_type", "must be a number, not a boolean")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        if value.strip().lower().lstrip("+-") in (".inf", ".nan"):  # YAML's spelling of infinity and NaN
            raise PydanticCustomError("decimal_finite", "must be a finite number")
        try:
            result = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise PydanticCustomError("decimal_parsing", "must be a number") from None
    elif isinstance(value, float):
        raise PydanticCustomError("decimal_float", "must be written as decimal text, not a binary float")
    else:
        raise PydanticCustomError("decimal_type", "must be a number")
    if not result.is_finite():
        raise PydanticCustomError("decimal_finite", "must be a finite number")
    if result.copy_abs() >= MAX_MAGNITUDE:  # copy_abs, unlike abs(), never rounds nor overflows
        # no real amount, price or fee comes near it; unbounded, `9.0e+999999` would pass and overflow Decimal
        # arithmetic in the planner (an internal error instead of a located one)
        raise PydanticCustomError("decimal_magnitude", "must be less than 1e30 in size")
    return result


def _ranged(lo: Decimal | None, hi: Decimal | None, *, lo_open: bool = False) -> BeforeValidator:
    def check(value: Any) -> Decimal:
        d = to_decimal(value)
        too_low = lo is not None and (d <= lo if lo_open else d < lo)
        too_high = hi is not None and d > hi
        if too_low or too_high:
            if lo is not None and hi is not None:
                raise PydanticCustomError("range", f"must be between {lo} and {hi}")
            if lo is not None:
                raise PydanticCustomError("range", f"must be {'above' if lo_open else 'at least'} {lo}")
            raise PydanticCustomError("range", f"must be at most {hi}")
        return d

    return BeforeValidator(check)


# the decimal text `to_decimal` accepts, so that an editor never flags a value the loader takes (1e-4, "0.4")
NUMBER_PATTERN = r"^\s*[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9][0-9_]*)([eE][-+]?[0-9]+)?\s*$"
_schema_number = WithJsonSchema({"type": ["number", "string"], "pattern": NUMBER_PATTERN})
_as_text = PlainSerializer(lambda d: str(d), return_type=str, when_used="json")


def Ranged(lo: str | None, hi: str | None, *, lo_open: bool = False) -> Any:
    """A Decimal constrained to [lo, hi] (or (lo, hi] with lo_open)."""
    lo_d = Decimal(lo) if lo is not None else None
    hi_d = Decimal(hi) if hi is not None else None
    return Annotated[Decimal, _ranged(lo_d, hi_d, lo_open=lo_open), _schema_number, _as_text]


AnyDecimal = Annotated[Decimal, BeforeValidator(to_decimal), _schema_number, _as_text]
Positive = Ranged("0", None, lo_open=True)
NonNegative = Ranged("0", None)
Fraction = Ranged("0", "1")
FeeRate = Ranged("0", "0.1")
BaseThreshold = Ranged("0.0001", "0.1")
VolatilityFactor = Ranged("0.1", "2.0")
SafetyMargin = Ranged("1.0", "5.0")
# gamma of the certainty-equivalent loss; the CLI's --risk-aversion takes the same range
RISK_AVERSION_RANGE = ("0.1", "100")
RiskAversion = Ranged(*RISK_AVERSION_RANGE)
Correlation = Ranged("-1", "1")
