//! Where an append's time goes inside PostgreSQL: the server CPU of one
//! append statement (or of one event in a 50-event batch), for the
//! minimal table of the append benchmarks, for Keel's row built up one
//! part at a time, and for Keel's own statements.
//!
//! Run with `cargo bench -p keel-eventstore --bench append_cost`.
//!
//! Each variant runs inside the server, in a procedure that executes the
//! statement `n` times, each in a transaction of its own (`COMMIT` after
//! every statement, `synchronous_commit = off` so that no variant waits
//! for the disk), and reads the backend's own CPU time from
//! `/proc/self/schedstat` before and after. That is CPU time, not wall
//! time: other processes on the machine slow a variant down far less than
//! they would a timer (they still share caches and cores). No client round
//! trip is included. Variants take turns in rounds (the order rotating),
//! and the report gives each one's median over the rounds and its range.
//!
//! Needs PostgreSQL on Linux and a superuser (for `pg_read_file`), as the
//! test kit's databases are. `KEEL_BENCH_SCALE` scales the statements per
//! round (default 1: 2,000 single-event statements, 100 batches).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use keel_testkit::TestDatabase;
use sqlx::{PgPool, Row};

/// `KEEL_BENCH_SCALE`, as the other benches read it (default 1).
fn scale() -> f64 {
    std::env::var("KEEL_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

/// The tables the variants write: the minimal table, Keel's row with parts
/// taken away, and with the CHECKs that migration 20261207091000 dropped.
const TABLES: &str = r#"
CREATE TABLE cost_minimal (id bigserial PRIMARY KEY, stream_id text NOT NULL,
    version bigint NOT NULL, payload json NOT NULL, UNIQUE (stream_id, version));
CREATE TABLE cost_minimal_id (id bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE,
    stream_id text NOT NULL, version bigint NOT NULL, payload json NOT NULL,
    UNIQUE (stream_id, version));
CREATE TABLE cost_narrow (position bigint GENERATED ALWAYS AS IDENTITY,
    commit bigint NOT NULL, event_id uuid NOT NULL, stream_id text NOT NULL,
    version bigint NOT NULL, payload json NOT NULL,
    PRIMARY KEY (commit, position), UNIQUE (event_id), UNIQUE (stream_id, version));
CREATE TABLE cost_no_id (LIKE keel.events INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE cost_no_id ADD PRIMARY KEY (commit, position), ADD UNIQUE (stream_id, version);
CREATE TABLE cost_full (LIKE keel.events INCLUDING DEFAULTS INCLUDING IDENTITY
    INCLUDING INDEXES);
CREATE TABLE cost_checks (LIKE keel.events INCLUDING DEFAULTS INCLUDING IDENTITY
    INCLUDING INDEXES);
ALTER TABLE cost_checks ADD CHECK (version > 0), ADD CHECK (event_type <> ''),
    ADD CHECK (schema_version > 0);
-- A time-ordered id like the client's UUID v7 (the index sees ids grow).
CREATE FUNCTION cost_uuid7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing
        substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                  FROM 3) FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid $$;
"#;

/// The procedure that runs one variant `n` times and returns the CPU
/// microseconds per statement (`p_per` = 1) or per event (`p_per` = 50).
const PROCEDURE: &str = r#"
CREATE PROCEDURE cost_run(p_variant text, p_n int, p_stream text,
                          INOUT p_us double precision DEFAULT NULL)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    pay  text := '{"order_id":"0190a6f2-7c1e-7d3a-9b1f-000000000042","sku":"SKU-12345","quantity":3,"price_cents":1999,"note":"leave at the door, ring twice"}';
    meta text := '{"correlation_id":"0193e4a1-7c1e-7d3a-9b1f-123456789abc","actor":"bench"}';
    types text[] := array_fill('order.line_added'::text, ARRAY[50]);
    schemas int4[] := array_fill(1, ARRAY[50]);
    pays text[];
    metas text[];
    ids uuid[];
    per int := CASE WHEN p_variant LIKE 'batch%' THEN 50 ELSE 1 END;
    c0 bigint;
    r record;
BEGIN
    pays := array_fill(pay, ARRAY[50]);
    metas := array_fill(meta, ARRAY[50]);
    -- Keel's exact-version statements follow version 1 of their stream.
    INSERT INTO keel.events (commit, event_id, stream_id, version, event_type,
                             schema_version, payload, metadata)
        VALUES (keel.next_commit(), gen_random_uuid(), p_stream, 1, 't', 1, '{}', '{}');
    COMMIT;
    SET synchronous_commit = off;
    c0 := split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint;
    FOR i IN 1..p_n LOOP
        IF per = 50 THEN
            ids := ARRAY(SELECT cost_uuid7() FROM generate_series(1, 50));
        END IF;
        CASE p_variant
        WHEN 'transaction only' THEN
            NULL;
        WHEN 'ids only' THEN
            PERFORM cost_uuid7();
        WHEN 'minimal' THEN
            INSERT INTO cost_minimal (stream_id, version, payload)
                VALUES (p_stream, i, pay::json);
        WHEN 'minimal + event id' THEN
            INSERT INTO cost_minimal_id (event_id, stream_id, version, payload)
                VALUES (cost_uuid7(), p_stream, i, pay::json);
        WHEN 'Keel row, narrow' THEN
            INSERT INTO cost_narrow (commit, event_id, stream_id, version, payload)
                VALUES (nextval('keel.commit_seq'), cost_uuid7(), p_stream, i, pay::json);
        WHEN 'Keel row, no event id' THEN
            INSERT INTO cost_no_id (commit, event_id, stream_id, version, event_type,
                                    schema_version, payload, metadata)
                VALUES (nextval('keel.commit_seq'), cost_uuid7(), p_stream, i,
                        'order.line_added', 1, pay::json, meta::json);
        WHEN 'Keel row' THEN
            INSERT INTO cost_full (commit, event_id, stream_id, version, event_type,
                                   schema_version, payload, metadata)
                VALUES (nextval('keel.commit_seq'), cost_uuid7(), p_stream, i,
                        'order.line_added', 1, pay::json, meta::json);
        WHEN 'Keel row + old CHECKs' THEN
            INSERT INTO cost_checks (commit, event_id, stream_id, version, event_type,
                                     schema_version, payload, metadata)
                VALUES (nextval('keel.commit_seq'), cost_uuid7(), p_stream, i,
                        'order.line_added', 1, pay::json, meta::json);
        WHEN 'Keel row + commit key' THEN
            INSERT INTO cost_full (commit, event_id, stream_id, version, event_type,
                                   schema_version, payload, metadata)
                VALUES (keel.take_commit(), cost_uuid7(), p_stream, i,
                        'order.line_added', 1, pay::json, meta::json);
        WHEN 'Keel statement, no probe' THEN
            INSERT INTO keel.events (commit, event_id, stream_id, version, event_type,
                                     schema_version, payload, metadata)
                VALUES (keel.take_commit(), cost_uuid7(), p_stream, i + 1,
                        'order.line_added', 1, pay::json, meta::json)
                RETURNING position, commit, version INTO r;
        WHEN 'Keel statement' THEN
            INSERT INTO keel.events (commit, event_id, stream_id, version, event_type,
                                     schema_version, payload, metadata)
                SELECT keel.take_commit(), cost_uuid7(), p_stream, i + 1,
                       'order.line_added', 1, pay::json, meta::json
                WHERE EXISTS (SELECT 1 FROM keel.events
                              WHERE stream_id = p_stream AND version = i)
                RETURNING position, commit, version INTO r;
        WHEN 'batch: ids only' THEN
            NULL;
        WHEN 'batch: minimal' THEN
            INSERT INTO cost_minimal (stream_id, version, payload)
                SELECT p_stream, (i - 1) * 50 + n.ord, n.p::json
                FROM unnest(pays) WITH ORDINALITY AS n(p, ord);
        WHEN 'batch: Keel row' THEN
            INSERT INTO cost_full (commit, event_id, stream_id, version, event_type,
                                   schema_version, payload, metadata)
                SELECT (SELECT nextval('keel.commit_seq')), n.id, p_stream,
                       (i - 1) * 50 + n.ord, n.t, n.s, n.p::json, n.m::json
                FROM unnest(ids, types, schemas, pays, metas)
                     WITH ORDINALITY AS n(id, t, s, p, m, ord);
        WHEN 'batch: Keel row + old CHECKs' THEN
            INSERT INTO cost_checks (commit, event_id, stream_id, version, event_type,
                                     schema_version, payload, metadata)
                SELECT (SELECT nextval('keel.commit_seq')), n.id, p_stream,
                       (i - 1) * 50 + n.ord, n.t, n.s, n.p::json, n.m::json
                FROM unnest(ids, types, schemas, pays, metas)
                     WITH ORDINALITY AS n(id, t, s, p, m, ord);
        WHEN 'batch: Keel statement' THEN
            FOR r IN
                INSERT INTO keel.events (commit, event_id, stream_id, version, event_type,
                                         schema_version, payload, metadata)
                SELECT (SELECT keel.take_commit()), n.id, p_stream, (i - 1) * 50 + 1 + n.ord,
                       n.t, n.s, n.p::json, n.m::json
                FROM unnest(ids, types, schemas, pays, metas)
                     WITH ORDINALITY AS n(id, t, s, p, m, ord)
                WHERE EXISTS (SELECT 1 FROM keel.events
                              WHERE stream_id = p_stream AND version = (i - 1) * 50 + 1)
                RETURNING position, commit, version
            LOOP
            END LOOP;
        END CASE;
        COMMIT;
    END LOOP;
    p_us := (split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint - c0)
            / 1e3 / p_n / per;
END $$;
"#;

const SINGLES: &[&str] = &[
    "transaction only",
    "ids only",
    "minimal",
    "minimal + event id",
    "Keel row, narrow",
    "Keel row, no event id",
    "Keel row",
    "Keel row + old CHECKs",
    "Keel row + commit key",
    "Keel statement, no probe",
    "Keel statement",
];

const BATCHES: &[&str] = &[
    "batch: ids only",
    "batch: minimal",
    "batch: Keel row",
    "batch: Keel row + old CHECKs",
    "batch: Keel statement",
];

async fn run(pool: &PgPool, variants: &[&str], n: i32, rounds: usize) -> Vec<Vec<f64>> {
    let mut samples = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let stream = format!("cost-{round}-{v}-{}", uuid::Uuid::now_v7().simple());
            // The simple protocol: the procedure commits inside.
            let row = sqlx::raw_sql(&format!(
                "CALL cost_run('{}', {n}, '{stream}')",
                variants[v]
            ))
            .fetch_one(pool)
            .await
            .unwrap();
            let us: f64 = row.get(0);
            samples[v].push(us);
        }
    }
    samples
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints one table. Single-event variants: the first two rows are an
/// empty transaction and one that only generates an id; the id's cost is
/// taken off every variant that generates one (all but the minimal table).
/// Batches: every variant generates its 50 ids first, and the first row
/// (ids only) is taken off all of them.
fn report(title: &str, unit: &str, variants: &[&str], samples: &[Vec<f64>], batch: bool) {
    let (id_cost, minimal_at) = if batch {
        (median(&samples[0]), 1)
    } else {
        (median(&samples[1]) - median(&samples[0]), 2)
    };
    let makes_ids = |name: &str| {
        if batch {
            !name.ends_with("ids only")
        } else {
            !matches!(name, "transaction only" | "ids only" | "minimal")
        }
    };
    let net = |name: &str, m: f64| if makes_ids(name) { m - id_cost } else { m };
    let minimal = net(variants[minimal_at], median(&samples[minimal_at]));
    println!(
        "| {title} | CPU µs per {unit}, median (range) | net of generating the event ids | ÷ minimal |"
    );
    println!("|---|---|---|---|");
    for (name, s) in variants.iter().zip(samples) {
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        let m = median(s);
        let n = net(name, m);
        println!(
            "| {name} | {m:.2} ({lo:.2}–{hi:.2}) | {n:.2} | {:.2}x |",
            n / minimal
        );
    }
    println!();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    let pool = db.pool().clone();
    sqlx::raw_sql(TABLES).execute(&pool).await.unwrap();
    sqlx::raw_sql(PROCEDURE).execute(&pool).await.unwrap();
    let rounds: usize = std::env::var("KEEL_COST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let singles = ((2_000.0 * scale()) as i32).max(10);
    let batches = ((100.0 * scale()) as i32).max(2);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("{rounds} rounds, load average before: {}", load.trim());
    println!();
    let samples = run(&pool, SINGLES, singles, rounds).await;
    report(
        "single-event statement",
        "statement",
        SINGLES,
        &samples,
        false,
    );
    let samples = run(&pool, BATCHES, batches, rounds).await;
    report("50-event batch", "event", BATCHES, &samples, true);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average after: {}", load.trim());
}
