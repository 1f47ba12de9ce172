"""The embedded paper exchange: markets and books from a snapshot file, balances and orders kept in SQLite.

It answers exactly like a real exchange would for the calls the executor makes (client order ids are unique,
duplicates are refused, an order can be looked up after a crash), so the quick start exercises the same
execution path as production, with no server and no network.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from ..config import Config
from ..costs import walk_book, within_limit
from ..errors import (
    BadSymbolError,
    InsufficientFundsError,
    InvalidOrderError,
    OrderAlreadyPlacedError,
    OrderNotFoundError,
    StoreError,
)
from ..fsutil import open_sqlite
from ..planner import PlannerState
from ..snapshot import Market, Snapshot, load_snapshot
from .base import FillInfo, OrderResult, Protection, Side

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class PaperFill:
    """How a market order fills on paper: what changes hands, and the fee in the asset received."""

    side: str
    filled: Decimal  # base units taken from the book
    cost: Decimal  # quote paid (buy) or received before the fee (sell)
    fee: Decimal
    fee_currency: str
    base_delta: Decimal  # change of the base balance, fee included
    quote_delta: Decimal  # change of the quote balance, fee included
    status: str  # closed, or expired when the visible book held less than asked


def paper_fill(
    market: Market,
    side: str,
    amount: Decimal,
    *,
    base_free: Decimal,
    quote_free: Decimal,
    limit: Decimal | None = None,
) -> PaperFill:
    """The paper exchange's fill rule, pure: the paper exchange and the backtest both fill through it, so a
    backtest's fills are the fills `execute` would get on paper.

    Walks the side the order takes; the taker fee is charged in the asset received (base on a buy, quote on
    a sell), as most spot exchanges do. Refuses what the paper exchange refuses.
    """
    if side not in ("buy", "sell"):
        raise InvalidOrderError(f"side must be buy or sell, not {side}")
    if amount <= 0 or amount % market.amount_step != 0:
        raise InvalidOrderError(
            f"{market.symbol}: amount {amount} is not a positive multiple of the lot {market.amount_step}"
        )
    if limit is not None and amount * limit < market.min_notional:
        # exchanges check a limit order's notional at its limit price, before anything fills
        raise InvalidOrderError(f"{market.symbol}: notional {amount * limit} below the minimum {market.min_notional}")
    walk = walk_book(within_limit(market.asks if side == "buy" else market.bids, side, limit), amount)
    if walk.filled == 0 and limit is not None:
        # an immediate-or-cancel limit that the book does not reach: nothing trades, the order expires
        return PaperFill(side, ZERO, ZERO, ZERO, market.quote, ZERO, ZERO, "expired")
    if limit is None and walk.notional < market.min_notional:
        raise InvalidOrderError(f"{market.symbol}: notional {walk.notional} below the minimum {market.min_notional}")
    status = "closed" if not walk.capped else "expired"
    if side == "buy":
        if quote_free < walk.notional:
            raise InsufficientFundsError(f"paper account has not {walk.notional} {market.quote} free")
        fee = walk.filled * market.taker_fee
        return PaperFill(side, walk.filled, walk.notional, fee, market.base, walk.filled - fee, -walk.notional, status)
    if base_free < walk.filled:
        raise InsufficientFundsError(f"paper account has not {walk.filled} {market.base} free")
    fee = walk.notional * market.taker_fee
    return PaperFill(side, walk.filled, walk.notional, fee, market.quote, -walk.filled, walk.notional - fee, status)


_SCHEMA = """
create table if not exists accounts (account text primary key, fingerprint text not null);
create table if not exists balances (account text, asset text, free text not null, primary key (account, asset));
create table if not exists orders (
    account text, client_order_id text, order_id integer not null, market text not null, side text not null,
    amount text not null, filled text not null, cost text not null, fee text not null, fee_currency text not null,
    status text not null, created_at text not null, primary key (account, client_order_id));
"""


class PaperExchange:
    id = "paper"
    protection: Protection = "ioc_limit"
    # Like a real exchange, the paper exchange refuses a request older than its validity window (counted from
    # before the executor's last checks): a writer frozen after them can never trade behind its successor.
    request_window = 1.0
    settle_window = request_window + 1.0

    def __init__(self, snapshot_path: Path, state_dir: Path, account: str, *, now: datetime | None = None) -> None:
        self._book = load_snapshot(snapshot_path)
        self._account = account
        self._now = now
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        try:
            self._db = open_sqlite(state_dir / "paper.sqlite3", timeout=30)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"paper exchange state in {state_dir} is unusable: {exc}") from None
        self._open_account()

    # -- state ---------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("begin immediate")
            try:
                yield self._db
            except BaseException:
                self._db.execute("rollback")
                raise
            self._db.execute("commit")

    def _open_account(self) -> None:
        """The snapshot's balances open the account; editing them in the file starts the account afresh."""
        opening = sorted((k, str(v)) for k, v in self._book.balances.items())
        fingerprint = hashlib.sha256(repr(opening).encode()).hexdigest()
        with self._tx() as db:
            row = db.execute("select fingerprint from accounts where account=?", (self._account,)).fetchone()
            if row and row[0] == fingerprint:
                return
            db.execute("delete from balances where account=?", (self._account,))
            db.execute("delete from orders where account=?", (self._account,))
            db.execute("insert or replace into accounts values (?, ?)", (self._account, fingerprint))
            db.executemany("insert into balances values (?, ?, ?)", [(self._account, k, v) for k, v in opening])

    def _balance(self, db: sqlite3.Connection, asset: str) -> Decimal:
        row = db.execute("select free from balances where account=? and asset=?", (self._account, asset)).fetchone()
        return Decimal(row[0]) if row else ZERO

    def _add(self, db: sqlite3.Connection, asset: str, delta: Decimal) -> None:
        new = self._balance(db, asset) + delta
        db.execute("insert or replace into balances values (?, ?, ?)", (self._account, asset, str(new)))

    # -- protocol ------------------------------------------------------------------------------------

    def fetch_balances(self) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        self.calls["balance"] += 1
        rows = self._db.execute("select asset, free from balances where account=?", (self._account,)).fetchall()
        return {a: Decimal(v) for a, v in rows}, {}

    def fetch_snapshot(
        self, config: Config, state: PlannerState | None = None, *, full_books: bool = False
    ) -> Snapshot:
        # the snapshot file's books are always complete: `full_books` changes nothing here
        free, locked = self.fetch_balances()
        self.calls["books"] += 1
        return Snapshot(
            taken_at=self._now or datetime.now(UTC),
            balances=free,
            markets=dict(self._book.markets),
            locked=locked,
            source=f"paper:{self._book.source}",
        )

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
        self.calls["create_order"] += 1
        m = self._book.markets.get(market)
        if m is None:
            raise BadSymbolError(f"paper exchange has no market {market}")
        if side not in ("buy", "sell"):
            raise InvalidOrderError(f"side must be buy or sell, not {side}")
        if amount <= 0 or amount % m.amount_step != 0:
            raise InvalidOrderError(f"{market}: amount {amount} is not a positive multiple of the lot {m.amount_step}")
        signed_at = time.time()
        if before_send is not None:
            before_send()
        with self._tx() as db:
            if time.time() - signed_at > self.request_window:
                raise InvalidOrderError(
                    f"paper exchange: request older than its {self.request_window:.0f}s validity window, refused"
                )
            if db.execute(
                "select 1 from orders where account=? and client_order_id=?", (self._account, client_order_id)
            ).fetchone():
                raise OrderAlreadyPlacedError(f"order {client_order_id} was already placed")
            fill = paper_fill(
                m,
                side,
                amount,
                base_free=self._balance(db, m.base),
                quote_free=self._balance(db, m.quote),
                limit=worst_price,
            )
            self._add(db, m.quote, fill.quote_delta)
            self._add(db, m.base, fill.base_delta)
            order_id = db.execute("select coalesce(max(order_id), 0) + 1 from orders").fetchone()[0]
            now = (self._now or datetime.now(UTC)).isoformat()
            db.execute(
                "insert into orders values (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    self._account,
                    client_order_id,
                    order_id,
                    market,
                    side,
                    str(amount),
                    str(fill.filled),
                    str(fill.cost),
                    str(fill.fee),
                    fill.fee_currency,
                    fill.status,
                    now,
                ),
            )
        result = self._order(client_order_id)
        assert result is not None
        return result

    def _order(self, client_order_id: str) -> OrderResult | None:
        row = self._db.execute(
            "select order_id, market, side, amount, filled, cost, fee, fee_currency, status, created_at "
            "from orders where account=? and client_order_id=?",
            (self._account, client_order_id),
        ).fetchone()
        if row is None:
            return None
        order_id, market, side, amount, filled, cost, fee, fee_ccy, status, created = row
        filled_d, cost_d = Decimal(filled), Decimal(cost)
        fills = (
            (
                FillInfo(
                    f"{order_id}-1",
                    filled_d,
                    cost_d / filled_d,
                    Decimal(fee),
                    fee_ccy,
                    datetime.fromisoformat(created),
                ),
            )
            if filled_d
            else ()
        )
        return OrderResult(
            client_order_id=client_order_id,
            exchange_order_id=str(order_id),
            market=market,
            side=side,
            status=status,
            amount=Decimal(amount),
            filled=filled_d,
            average=cost_d / filled_d if filled_d else None,
            cost=cost_d,
            fees={fee_ccy: Decimal(fee)},
            fills=fills,
        )

    def fetch_order(self, market: str, client_order_id: str) -> OrderResult | None:
        self.calls["fetch_order"] += 1
        return self._order(client_order_id)

    def cancel_order(self, market: str, client_order_id: str) -> None:
        self.calls["cancel_order"] += 1
        order = self._order(client_order_id)
        if order is None:
            raise OrderNotFoundError(f"paper exchange does not know order {client_order_id}")
        # market orders fill at once on paper: nothing is ever left open to cancel

    def batch(self, requests: int) -> AbstractContextManager[None]:
        return nullcontext()  # no request budget on paper

    def close(self) -> None:
        self._db.close()
