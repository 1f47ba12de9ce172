"""Metrics (Prometheus), traces (OpenTelemetry) and structured logs, with the names README's daemon section documents.

Metrics live in a registry of our own (not the process-global default) so that a library caller or a test can
run several daemons in one process. Spans go through the OpenTelemetry API, which is a no-op until an OTLP
endpoint is configured (`--otlp-endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT), so an idle tool pays nothing.
Logs never carry secrets: they are built from our own fields, never from exchange requests.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double what a scraper already knows

LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metric set README documents, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Not by portfolio: 16 series per portfolio made /metrics of a 5,000-portfolio instance 80,000 lines
        # (seconds of CPU per scrape, and a cardinality Prometheus warns against); the alert on latency sums
        # over portfolios anyway, and each cycle's duration is in its log line.
        self.duration = Histogram(
            "rebalance_duration_seconds",
            "Duration of one rebalance cycle (snapshot, plan, execute)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lateness = Histogram(
            "rebalance_schedule_lateness_seconds",
            "How long after its due time a cycle started; growing values mean the instance is overloaded",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.drift = Gauge(
            "portfolio_drift_ratio",
            "Total drift of a portfolio (sum of |target - current|)",
            ["portfolio_id"],
            registry=r,
        )
        self.cost_ratio = Gauge(
            "rebalance_cost_ratio",
            "Estimated cost of the last plan over the value of the drift it corrects",
            ["portfolio_id"],
            registry=r,
        )
        self.rate_limit_remaining = Gauge(
            "exchange_rate_limit_remaining", "Request budget left in the bucket", ["exchange"], registry=r
        )
        self.lock_failures = Counter(
            "shadow_ledger_lock_failures", "Locks the shadow ledger refused", ["portfolio_id"], registry=r
        )
        self.breaker = Gauge("circuit_breaker_state", "0 closed, 1 open, 0.5 half-open", ["exchange"], registry=r)
        self.orders = Counter("orders", "Orders by side and result", ["side", "result"], registry=r)
        self.api_calls = Counter("exchange_api_calls", "Exchange API calls by endpoint", ["endpoint"], registry=r)
        self.cycles = Counter(
            "rebalance_cycles", "Cycles by portfolio and outcome", ["portfolio_id", "outcome"], registry=r
        )
        self.leases = Gauge("daemon_leases_held", "Portfolios this instance holds the lease of", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- tracing ----------------------------------------------------------------------------------------


_tracer: Any = None
_endpoint: str | None = None


def tracing_endpoint() -> str | None:
    """Where spans go, once configured: worker processes of the daemon configure the same."""
    return _endpoint


def configure_tracing(endpoint: str | None, service: str = "rebalance") -> bool:
    """Export spans over OTLP/HTTP when an endpoint is given and the `otlp` extra is installed."""
    global _tracer, _endpoint
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logging.getLogger("rebalance").warning(
            "OTLP endpoint set but the otlp extra is not installed (pip install 'rebalance[otlp]'); tracing off"
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("rebalance")
    _endpoint = endpoint
    return True


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A span around a unit of work; costs one attribute check when tracing is off."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes={k: str(v) for k, v in attributes.items()}):
        yield


# --- logs --------------------------------------------------------------------------------------------

# Values that must never appear in a log line (API keys and secrets read from the environment). Log events are
# built from our own fields, but an exception message from a library may quote a request; the formatters
# replace every registered value as the last step, whatever produced the text.
_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
MIN_SECRET_LENGTH = 6  # shorter values would redact ordinary words; no real credential is that short


def register_secret(value: str) -> None:
    if len(value) >= MIN_SECRET_LENGTH:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class JsonFormatter(logging.Formatter):
    """One event per line, for log shippers: time, level, event, and the structured fields we attached."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            event.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            event["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            event["traceback"] = self.formatException(record.exc_info)  # a bug: the stack is what fixes it
        return redact(json.dumps(event, default=str))


def _text_value(value: Any) -> str:
    """A field value for one readable line: an order as `sell 0.29692 BTC/USDC filled`, a mapping as
    `BTC: hard band breached, ETH: below threshold`, text with spaces quoted, never a Python repr."""
    if isinstance(value, Mapping):
        if {"side", "amount", "market", "status"} <= value.keys():
            return f"{value['side']} {value['amount']} {value['market']} {value['status']}"
        return ", ".join(f"{k}: {_text_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "; ".join(_text_value(v) for v in value)
    return " ".join(str(value).split())  # one line: newlines and runs of spaces become one space


def _text_field(key: str, value: Any) -> str:
    text = _text_value(value)
    return f'{key}="{text}"' if (" " in text or not text) else f"{key}={text}"


class TextFormatter(logging.Formatter):
    """One line per event for a terminal: time, level, event, then key=value fields (a traceback, when
    there is one, follows on its own lines)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        trace = fields.get("traceback") if isinstance(fields, Mapping) else None
        extra = " ".join(_text_field(k, v) for k, v in fields.items() if v is not None and v != [] and k != "traceback")
        if trace:
            extra += "\n" + str(trace).rstrip()
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()}" + (f" {extra}" if extra else "")
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def setup_logging(fmt: str = "auto", level: str = "info") -> logging.Logger:
    logger = logging.getLogger("rebalance")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})


# --- /metrics and /healthz -------------------------------------------------------------------------


class MetricsServer:
    """`/metrics` (Prometheus text format) and `/healthz` (readiness) on 127.0.0.1 or a given host."""

    def __init__(self, metrics: Metrics, health: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body, status, ctype = outer.metrics.exposition(), 200, CONTENT_TYPE_LATEST
                elif self.path.split("?")[0] == "/healthz":
                    ok, detail = outer.health()
                    body = json.dumps({"ok": ok, **detail}).encode()
                    status, ctype = (200 if ok else 503), "application/json"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.metrics = metrics
        self.health = health
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, forever if it never started
            self.server.shutdown()
        self.server.server_close()
