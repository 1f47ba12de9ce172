"""`examples/alerts.yml`: every alert the issue asks for is there, and every metric its rules use is one a
running daemon really exports (a typo in a metric name makes an alert that can never fire, silently)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES
from daemon_helpers import CREDENTIALS_ENV, emulator_exchange, pair_config, pair_snapshot, sample_names, scrape

from rebalancer_cli.daemon import Daemon
from rebalancer_cli.telemetry import MetricsServer
from rebalancer_cli.testing.emulator import start_emulator

ALERTS = EXAMPLES / "alerts.yml"

# PromQL words that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bool", "bottomk", "by", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp",
    "floor", "group", "group_left", "group_right", "histogram_quantile", "holt_winters", "idelta", "ignoring",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log2", "log10", "max",
    "max_over_time", "min", "min_over_time", "offset", "on", "predict_linear", "quantile", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar",
    "sum", "sum_over_time", "time", "timestamp", "topk", "vector", "without", "and", "or", "unless", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers, minus label matchers, groupings, ranges, strings,
    numbers and PromQL's own words."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"(?<![A-Za-z_:])\d+(\.\d+)?([eE][+-]?\d+)?[smhdwy]?", " ", text)  # numbers and durations
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if w.lower() not in PROMQL_WORDS}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_extractor_finds_metric_names_and_nothing_else() -> None:
    expr = 'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job="x"}[5m]))) > 1e-1 and on(x) b:rec'
    assert metric_names(expr) == {"a_bucket", "b:rec"}


def test_the_rules_file_holds_every_alert_the_operators_need() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules()}
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
    joined = "\n".join(exprs.values())
    assert re.search(r"histogram_quantile\(0\.99,.*rebalance_duration_seconds_bucket.*> 0\.1\b", joined), "p99 > 100ms"
    assert "portfolio_drift_ratio > 0.001" in joined, "drift above 0.1%"
    assert "circuit_breaker_state == 1" in joined, "breaker open"
    assert "increase(shadow_ledger_lock_failures_total[10m]) > 0" in joined, "lock failures"
    assert "rebalance_cost_ratio > 1" in joined, "cost above benefit"


def test_every_metric_the_rules_use_is_exported_by_a_daemon_after_a_cycle(
    tmp_path: Path, state_dir: Path, unique_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert used, "the rules use metrics"
    emulator = start_emulator(pair_snapshot(tmp_path / "exchange.json", [0]))
    try:
        pair_config(tmp_path / "p.yaml", unique_id, 0, emulator_exchange(emulator.base_url), interval=60)
        daemon = Daemon([tmp_path / "p.yaml"], lease_ttl=3, join_delay=0, tick=0.05)
        http = MetricsServer(daemon.metrics, daemon.health).start()
        loop = threading.Thread(target=daemon.run)
        loop.start()
        try:
            deadline = time.monotonic() + 30
            while not daemon.metrics.registry.get_sample_value(
                "rebalance_cycles_total", {"portfolio_id": unique_id, "outcome": "done"}
            ):
                assert time.monotonic() < deadline and loop.is_alive(), "no cycle"
                time.sleep(0.05)
            _, samples = scrape(http.port)
        finally:
            daemon.stop()
            loop.join(timeout=15)
            http.stop()
    finally:
        emulator.stop()
    exported = sample_names(samples)
    missing = sorted(name for name in used if name not in exported)
    assert not missing, f"alerts use metrics the daemon does not export: {missing}"


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (it ships with Prometheus)")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
