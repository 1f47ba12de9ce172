-- Audit store, SQLite. Decimals are TEXT (never REAL), times are UTC ISO-8601 text of fixed width so that
-- text order is time order.

CREATE TABLE plans (
    plan_id TEXT PRIMARY KEY,
    portfolio_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    plan TEXT NOT NULL,
    drift_before TEXT NOT NULL,
    status TEXT NOT NULL,
    drift_after TEXT,
    finished_at TEXT
);
CREATE INDEX plans_portfolio_idx ON plans (portfolio_id, created_at DESC, plan_id DESC);

CREATE TABLE orders (
    key TEXT PRIMARY KEY,
    portfolio_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    market TEXT NOT NULL,
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    amount TEXT NOT NULL,
    est_price TEXT NOT NULL,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN (
        'intent', 'locked', 'sent', 'partially_filled', 'filled', 'rejected', 'cancelled', 'unknown')),
    exchange_order_id TEXT,
    reason TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX orders_open_idx ON orders (portfolio_id, created_at, key)
    WHERE status NOT IN ('filled', 'rejected', 'cancelled');
CREATE INDEX orders_plan_idx ON orders (plan_id);

CREATE TABLE fills (
    key TEXT NOT NULL REFERENCES orders (key),
    fill_id TEXT NOT NULL,
    portfolio_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    amount TEXT NOT NULL,
    price TEXT NOT NULL,
    fee TEXT NOT NULL,
    fee_currency TEXT NOT NULL,
    at TEXT NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    PRIMARY KEY (key, fill_id)
);
CREATE INDEX fills_portfolio_at_idx ON fills (portfolio_id, at);
CREATE INDEX fills_plan_idx ON fills (plan_id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    portfolio_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_portfolio_idx ON events (portfolio_id, at DESC, id DESC);
