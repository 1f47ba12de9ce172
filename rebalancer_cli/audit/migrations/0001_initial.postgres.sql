-- Audit store, PostgreSQL: plans, orders, fills and events, each partitioned by month on its time column.
--
-- Primary keys of partitioned tables must contain the partition column, which alone would let one
-- idempotency key exist twice (once per partition). Orders and fills are therefore partitioned on the time
-- carried inside the order key (a UUIDv7 starts with its unix milliseconds), and a CHECK ties that column to
-- the key: the same key always lands in the same partition, so the primary key makes the key unique.
-- Plans get the same guarantee from the small unpartitioned plan_keys table.

CREATE FUNCTION rb_uuid7_time(k uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    -- integer days plus milliseconds of the day: exact for every 48-bit timestamp, no float rounding
    SELECT (timestamp '1970-01-01 00:00:00'
            + make_interval(days => (ms / 86400000)::integer, secs => (ms % 86400000)::float8 / 1000))
           AT TIME ZONE 'UTC'
    FROM (SELECT ('x' || lpad(substr(replace(k::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint AS ms) AS s
$$;

-- plan ids sort bytewise ("C"), as in SQLite, so that both backends list plans in the same order
CREATE TABLE plan_keys (
    plan_id text COLLATE "C" PRIMARY KEY,
    created_at timestamptz NOT NULL
);

CREATE TABLE plans (
    plan_id text COLLATE "C" NOT NULL,
    portfolio_id text NOT NULL,
    created_at timestamptz NOT NULL,
    plan jsonb NOT NULL,
    drift_before numeric NOT NULL,
    status text NOT NULL,
    drift_after numeric,
    finished_at timestamptz,
    PRIMARY KEY (plan_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX plans_portfolio_idx ON plans (portfolio_id, created_at DESC, plan_id DESC);
CREATE TABLE plans_default PARTITION OF plans DEFAULT;

CREATE TABLE orders (
    key uuid NOT NULL,
    key_time timestamptz NOT NULL,
    portfolio_id text NOT NULL,
    plan_id text NOT NULL,
    market text NOT NULL,
    side text NOT NULL CHECK (side IN ('buy', 'sell')),
    amount numeric NOT NULL CHECK (amount > 0),
    est_price numeric NOT NULL CHECK (est_price > 0),
    created_at timestamptz NOT NULL,
    status text NOT NULL CHECK (status IN (
        'intent', 'locked', 'sent', 'partially_filled', 'filled', 'rejected', 'cancelled', 'unknown')),
    exchange_order_id text,
    reason text,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (key, key_time),
    CONSTRAINT orders_key_time CHECK (key_time = rb_uuid7_time(key))
) PARTITION BY RANGE (key_time);
-- crash recovery reads only the few live orders: a partial index keeps that cheap however long the history
CREATE INDEX orders_open_idx ON orders (portfolio_id, created_at, key)
    WHERE status NOT IN ('filled', 'rejected', 'cancelled');
CREATE INDEX orders_plan_idx ON orders (plan_id);
CREATE TABLE orders_default PARTITION OF orders DEFAULT;

-- Fills live in their order's partition (same key time), so (key, fill_id) is unique and an order's fills
-- are found in one partition. portfolio_id and plan_id are copied from the order for fee and history sums.
CREATE TABLE fills (
    key uuid NOT NULL,
    key_time timestamptz NOT NULL,
    fill_id text NOT NULL,
    portfolio_id text NOT NULL,
    plan_id text NOT NULL,
    amount numeric NOT NULL CHECK (amount > 0),
    price numeric NOT NULL CHECK (price > 0),
    fee numeric NOT NULL,
    fee_currency text NOT NULL,
    at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, fill_id, key_time),
    CONSTRAINT fills_key_time CHECK (key_time = rb_uuid7_time(key))
) PARTITION BY RANGE (key_time);
CREATE INDEX fills_portfolio_at_idx ON fills (portfolio_id, at);
CREATE INDEX fills_plan_idx ON fills (plan_id);
CREATE TABLE fills_default PARTITION OF fills DEFAULT;

CREATE TABLE events (
    id bigserial NOT NULL,
    portfolio_id text NOT NULL,
    kind text NOT NULL,
    at timestamptz NOT NULL,
    detail jsonb NOT NULL,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE INDEX events_portfolio_idx ON events (portfolio_id, at DESC, id DESC);
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- Creates the monthly partitions from p_now's month to p_months_ahead months later; returns those created.
-- Rows that landed in a DEFAULT partition for a month now being created (a daemon that ran for months
-- without creating partitions, a clock far ahead) are moved into the new partition rather than making the
-- creation fail forever. Runs under the migration advisory lock; a concurrent creator is tolerated.
CREATE FUNCTION rb_ensure_partitions(p_now timestamptz, p_months_ahead integer) RETURNS SETOF text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    ns text := current_schema();
    first_month timestamp := date_trunc('month', p_now AT TIME ZONE 'UTC');
    spec record;
    m integer;
    lo timestamptz;
    hi timestamptz;
    part text;
    locked boolean := false;
    misplaced boolean;
BEGIN
    FOR spec IN
        SELECT * FROM (VALUES ('plans', 'created_at'), ('orders', 'key_time'), ('fills', 'key_time'),
                              ('events', 'at')) AS v(parent, col)
    LOOP
        FOR m IN 0 .. p_months_ahead LOOP
            lo := (first_month + make_interval(months => m)) AT TIME ZONE 'UTC';
            hi := (first_month + make_interval(months => m + 1)) AT TIME ZONE 'UTC';
            part := spec.parent || '_p' || to_char(first_month + make_interval(months => m), 'YYYY_MM');
            CONTINUE WHEN to_regclass(format('%I.%I', ns, part)) IS NOT NULL;
            IF NOT locked THEN
                PERFORM pg_advisory_xact_lock(hashtext('rebalance-audit:' || ns));
                locked := true;
                CONTINUE WHEN to_regclass(format('%I.%I', ns, part)) IS NOT NULL;
            END IF;
            BEGIN
                EXECUTE format('SELECT EXISTS (SELECT FROM %I.%I WHERE %I >= $1 AND %I < $2)',
                               ns, spec.parent || '_default', spec.col, spec.col)
                    INTO misplaced USING lo, hi;
                IF misplaced THEN
                    EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                                   ns, part, ns, spec.parent);
                    EXECUTE format('WITH moved AS (DELETE FROM %I.%I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                                   'INSERT INTO %I.%I SELECT * FROM moved',
                                   ns, spec.parent || '_default', spec.col, spec.col, ns, part)
                        USING lo, hi;
                    EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                                   ns, spec.parent, ns, part, lo, hi);
                ELSE
                    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
                                   ns, part, ns, spec.parent, lo, hi);
                END IF;
                RETURN NEXT part;
            EXCEPTION WHEN duplicate_table THEN
                NULL;  -- created meanwhile by another process: exactly what was wanted
            END;
        END LOOP;
    END LOOP;
END
$$;
