"""Saved plans (`plan --json > plan.json`, then `execute --plan plan.json`): the file format and its checks.

A saved plan is input like any other: it goes through the same strict loader as configs and snapshots (every
problem with its line and column, exit 2), and it is not trusted field by field. Its own integrity is checked
by a digest over what it would send (so an edited file is refused, not half-believed); keys are unique; and
every guard of the executor is computed from the fresh snapshot and the amounts to be sent, never from
numbers written in the file (`Executor.check_saved_plan`). The digest is a checksum, not a signature: it
catches edits and corruption; what keeps a forged plan from doing harm are the fresh-snapshot checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import yamlfile
from .decimals import AnyDecimal, Fraction, NonNegative, Positive
from .errors import InputError, InvalidFileError
from .planner import AssetLine, Plan, Summary, Trade

MAX_PLAN_BYTES = 10_000_000


def plan_digest(doc: Mapping[str, Any]) -> str:
    """sha256 over what the plan would do (portfolio, plan id, time, quote, and every trade as written)."""
    subject = {k: doc.get(k) for k in ("portfolio_id", "plan_id", "taken_at", "quote", "trades")}
    canonical = json.dumps(subject, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class _Model(BaseModel):
    # fields added by later versions are ignored; the ones used are all validated
    model_config = ConfigDict(extra="ignore")


class SavedAsset(_Model):
    symbol: str = Field(min_length=1)
    target_weight: Fraction
    current_weight: Fraction
    drift: AnyDecimal
    threshold: NonNegative
    drift_value: NonNegative
    est_cost: NonNegative
    decision: str
    reason: str
    mid: Positive


class SavedTrade(_Model):
    symbol: str = Field(min_length=1)
    market: str = Field(pattern=r"^[^/\s]+/[^/\s]+$")
    side: Literal["buy", "sell"]
    amount: Positive
    est_price: Positive
    notional: Positive
    est_fee: NonNegative
    est_slippage: NonNegative
    worst_price: Positive | None = None
    idempotency_key: str = Field(min_length=1)

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, v: str) -> str:
        from .audit.base import parse_order_key

        parse_order_key(v)
        return v


class SavedSummary(_Model):
    turnover: NonNegative
    est_total_cost: NonNegative
    drift_before: NonNegative
    drift_after: NonNegative


class SavedPlan(_Model):
    portfolio_id: str = Field(min_length=1)
    plan_id: str = Field(min_length=1)
    quote: str = Field(min_length=1)
    taken_at: datetime
    total_value: Positive
    assets: list[SavedAsset] = Field(min_length=1)
    trades: list[SavedTrade]
    summary: SavedSummary
    policy: str = ""
    notes: list[str] = []
    digest: str | None = None

    @field_validator("taken_at", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, str):
            parsed = datetime.fromisoformat(v.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise ValueError("must carry a timezone (e.g. a trailing Z for UTC)")
            return parsed
        raise ValueError("must be an ISO 8601 time such as 2026-11-27T10:00:00Z")


def load_saved_plan(path: Path) -> Plan:
    """Load, validate and integrity-check a saved plan; InvalidFileError / InputError (exit 2) otherwise."""
    text = yamlfile.read_text(path, kind="plan", max_bytes=MAX_PLAN_BYTES)
    try:
        raw = json.loads(text, parse_float=str, parse_int=str, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # the YAML loader locates what JSON cannot parse; JSON's own message otherwise
        doc = yamlfile.loads(text, file=str(path), kind="plan")
        if doc.problems:
            raise InvalidFileError(list(doc.problems)) from None
        raise InputError(f"{path}: not JSON as written by `rebalance plan --json` ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a saved plan is a JSON object, as printed by `rebalance plan --json`")
    doc = yamlfile.loads(text, file=str(path), kind="plan")
    model = yamlfile.validate(SavedPlan, doc)
    seen: set[str] = set()
    markets: set[str] = set()
    for i, t in enumerate(model.trades):
        if t.idempotency_key in seen:
            raise InvalidFileError(
                [doc.problem(("trades", i, "idempotency_key"), f"key {t.idempotency_key} appears twice")]
            )
        if t.market in markets:  # a plan trades each market once: a copied trade would trade it twice
            raise InvalidFileError([doc.problem(("trades", i, "market"), f"{t.market} is traded twice")])
        seen.add(t.idempotency_key)
        markets.add(t.market)
    if model.digest is None:
        raise InputError(f"{path}: the saved plan has no digest (saved by an older version?): plan again")
    if plan_digest(raw) != model.digest:
        raise InputError(
            f"{path}: the saved plan was edited after it was saved (its digest does not match): plan again"
        )
    return Plan(
        plan_id=model.plan_id,
        portfolio_id=model.portfolio_id,
        quote=model.quote,
        taken_at=model.taken_at,
        total_value=model.total_value,
        assets=tuple(
            AssetLine(
                a.symbol,
                a.target_weight,
                a.current_weight,
                a.drift,
                a.threshold,
                a.drift_value,
                a.est_cost,
                a.decision,
                a.reason,
                a.mid,
            )
            for a in model.assets
        ),
        trades=tuple(
            Trade(
                symbol=t.symbol,
                market=t.market,
                side=t.side,
                amount=t.amount,
                est_price=t.est_price,
                notional=t.notional,
                est_fee=t.est_fee,
                est_slippage=t.est_slippage,
                idempotency_key=t.idempotency_key,
                worst_price=t.worst_price,
            )
            for t in model.trades
        ),
        summary=Summary(
            model.summary.turnover, model.summary.est_total_cost, model.summary.drift_before, model.summary.drift_after
        ),
        policy=model.policy,
        notes=tuple(model.notes),
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a plan may hold")
