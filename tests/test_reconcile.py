"""`reconcile` finds where ledger and audit disagree with the exchange, and `--repair` aligns them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from conftest import EXAMPLES

from rebalancer_cli.audit import open_audit
from rebalancer_cli.audit.base import OrderIntent
from rebalancer_cli.ids import new_key
from rebalancer_cli.ledger import open_ledger
from rebalancer_cli.runtime import execute, reconcile


def _setup(tmp_path: Path) -> Path:
    for name in ("treasury.yaml", "market.yaml"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    return tmp_path / "treasury.yaml"


def test_reconcile_finds_and_repairs_every_kind_of_difference(tmp_path: Path, state_dir: Path) -> None:
    config = _setup(tmp_path)
    assert execute(config).status == "done"
    assert reconcile(config).consistent

    ledger = open_ledger(None, state_dir)
    ledger.sync_balances("treasury-v1", {"BTC": Decimal("9"), "ETH": Decimal("1"), "USDC": Decimal("5")})
    stray = new_key()
    assert ledger.lock("treasury-v1", stray, "USDC", Decimal("1"), ttl_seconds=600)
    ledger.close()
    audit = open_audit(None, state_dir)
    never_sent = new_key()
    audit.record_intent(
        OrderIntent(
            never_sent,
            "treasury-v1",
            "plan-x",
            "BTC/USDC",
            "buy",
            Decimal("0.001"),
            Decimal("65000"),
            datetime.now(UTC),
        )
    )
    audit.close()

    report = reconcile(config)
    kinds = {(d.kind, d.subject) for d in report.differences}
    assert {("balance", "BTC"), ("balance", "ETH"), ("balance", "USDC")} <= kinds
    assert ("lock", stray) in kinds
    assert ("order", never_sent) in kinds

    cli = [sys.executable, "-m", "rebalancer_cli", "reconcile", "--config", str(config)]
    assert subprocess.run(cli, capture_output=True).returncode == 4
    repaired = subprocess.run([*cli, "--repair"], capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stderr
    assert "repaired" in repaired.stdout
    assert reconcile(config).consistent
    audit = open_audit(None, state_dir)
    assert audit.order(never_sent).status.value == "cancelled"  # type: ignore[union-attr]
    assert any(kind == "reconcile_repair" for _, kind, _ in audit.events("treasury-v1"))
    audit.close()
