-- keel-eventstore: the append-only event log, stream heads, snapshots and
-- subscription checkpoints. See docs/event-store.md for the design.

-- The global order key of a writing transaction. It is the transaction's xid8
-- plus an offset that is 0 until an operator rebases it after a dump and
-- restore (xids restart on a new cluster; see keel.rebase_commit_order()).
CREATE FUNCTION keel.commit_offset() RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 0::bigint';

-- Commit key of the calling transaction (assigns an xid if it has none).
CREATE FUNCTION keel.current_commit() RETURNS bigint
    LANGUAGE sql VOLATILE AS
    'SELECT pg_current_xact_id()::text::bigint + keel.commit_offset()';

-- Every event with a commit key below this value was written by a transaction
-- that has ended: nothing can still appear below it.
CREATE FUNCTION keel.commit_horizon() RETURNS bigint
    LANGUAGE sql STABLE AS
    'SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint + keel.commit_offset()';

CREATE TABLE keel.streams (
    stream_id text PRIMARY KEY,
    version   bigint NOT NULL CHECK (version > 0)
);

CREATE TABLE keel.events (
    position       bigint GENERATED ALWAYS AS IDENTITY,
    commit         bigint NOT NULL DEFAULT keel.current_commit(),
    event_id       uuid NOT NULL,
    stream_id      text NOT NULL,
    version        bigint NOT NULL CHECK (version > 0),
    event_type     text NOT NULL CHECK (event_type <> ''),
    schema_version integer NOT NULL CHECK (schema_version > 0),
    payload        json NOT NULL,
    metadata       json NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

CREATE INDEX events_global_order_idx ON keel.events (commit, position);

-- Events are facts: the database itself refuses to change or remove them.
CREATE FUNCTION keel.refuse_event_mutation() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'keel.events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'KL002';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON keel.events
    FOR EACH ROW EXECUTE FUNCTION keel.refuse_event_mutation();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON keel.events
    FOR EACH STATEMENT EXECUTE FUNCTION keel.refuse_event_mutation();

-- Appends a batch to one stream in one round trip.
--
-- p_expected_mode: 0 any, 1 no stream, 2 stream exists, 3 exact (p_expected).
-- Returns one row: outcome 0 = appended, 1 = already stored by an earlier
-- identical append (idempotent retry), 2 = version conflict, 3 = an event id
-- is already used by a different event (see conflicting_event_id).
-- The stream's row is locked first, so the expected version is checked before
-- any position is taken: a losing writer burns no positions.
CREATE FUNCTION keel.append_events(
    p_stream_id       text,
    p_expected_mode   smallint,
    p_expected        bigint,
    p_event_ids       uuid[],
    p_event_types     text[],
    p_schema_versions integer[],
    p_payloads        text[],
    p_metadata        text[],
    p_notify          boolean
) RETURNS TABLE (
    outcome              smallint,
    actual_version       bigint,
    first_version        bigint,
    positions            bigint[],
    commits              bigint[],
    conflicting_event_id uuid
)
LANGUAGE plpgsql AS $$
DECLARE
    v_current  bigint;
    v_count    integer := cardinality(p_event_ids);
    v_existing integer;
    v_first    bigint;
    v_matches  integer;
    v_bad      uuid;
    v_created  boolean := false;
BEGIN
    LOOP
        SELECT s.version INTO v_current
            FROM keel.streams s WHERE s.stream_id = p_stream_id FOR UPDATE;
        EXIT WHEN FOUND;
        -- A new stream: claim it with its final version. If another writer
        -- created it meanwhile, lock its row instead and decide again.
        IF p_expected_mode IN (0, 1) OR (p_expected_mode = 3 AND p_expected = 0) THEN
            INSERT INTO keel.streams (stream_id, version)
                VALUES (p_stream_id, v_count)
                ON CONFLICT (stream_id) DO NOTHING;
            IF FOUND THEN
                v_current := 0;
                v_created := true;
                EXIT;
            END IF;
        ELSE
            v_current := 0;
            EXIT;
        END IF;
    END LOOP;

    -- Are any of these ids stored already? Only then is this a retry (or a
    -- misuse), so the common path costs one index probe per event.
    SELECT count(*) INTO v_existing FROM keel.events e WHERE e.event_id = ANY (p_event_ids);
    IF v_existing > 0 THEN
        SELECT min(e.version) INTO v_first
            FROM keel.events e
            WHERE e.event_id = ANY (p_event_ids) AND e.stream_id = p_stream_id;
        SELECT count(*) INTO v_matches
            FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads)
                 WITH ORDINALITY AS n(event_id, event_type, schema_version, payload, ord)
            JOIN keel.events e ON e.event_id = n.event_id
            WHERE e.stream_id = p_stream_id
              AND e.version = v_first + n.ord - 1
              AND e.event_type = n.event_type
              AND e.schema_version = n.schema_version
              AND e.payload::jsonb = n.payload::jsonb;
        IF v_matches = v_count AND v_existing = v_count
           AND (p_expected_mode <> 3 OR p_expected = v_first - 1)
           AND (p_expected_mode <> 1 OR v_first = 1) THEN
            RETURN QUERY
                SELECT 1::smallint, v_first + v_count - 1, v_first,
                       array_agg(e.position ORDER BY e.version),
                       array_agg(e.commit ORDER BY e.version),
                       NULL::uuid
                FROM keel.events e
                WHERE e.stream_id = p_stream_id
                  AND e.version BETWEEN v_first AND v_first + v_count - 1;
            RETURN;
        END IF;
        SELECT n.event_id INTO v_bad
            FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads)
                 WITH ORDINALITY AS n(event_id, event_type, schema_version, payload, ord)
            JOIN keel.events e ON e.event_id = n.event_id
            WHERE NOT (e.stream_id = p_stream_id
                       AND e.version = v_first + n.ord - 1
                       AND e.event_type = n.event_type
                       AND e.schema_version = n.schema_version
                       AND e.payload::jsonb = n.payload::jsonb)
            ORDER BY n.ord LIMIT 1;
        IF v_bad IS NULL THEN
            -- every stored id matches, but only part of the batch is stored
            -- or it was stored under another expectation
            SELECT n.event_id INTO v_bad
                FROM unnest(p_event_ids) WITH ORDINALITY AS n(event_id, ord)
                JOIN keel.events e ON e.event_id = n.event_id
                ORDER BY n.ord LIMIT 1;
        END IF;
        IF v_created THEN
            DELETE FROM keel.streams s WHERE s.stream_id = p_stream_id;
        END IF;
        RETURN QUERY SELECT 3::smallint, v_current, NULL::bigint, NULL::bigint[], NULL::bigint[], v_bad;
        RETURN;
    END IF;

    IF NOT (p_expected_mode = 0
            OR (p_expected_mode = 1 AND v_current = 0)
            OR (p_expected_mode = 2 AND v_current > 0)
            OR (p_expected_mode = 3 AND v_current = p_expected)) THEN
        RETURN QUERY SELECT 2::smallint, v_current, NULL::bigint, NULL::bigint[], NULL::bigint[], NULL::uuid;
        RETURN;
    END IF;

    IF v_current > 0 THEN
        UPDATE keel.streams s SET version = v_current + v_count WHERE s.stream_id = p_stream_id;
    END IF;

    RETURN QUERY
    WITH inserted AS (
        INSERT INTO keel.events
            (event_id, stream_id, version, event_type, schema_version, payload, metadata)
        SELECT n.event_id, p_stream_id, v_current + n.ord, n.event_type, n.schema_version,
               n.payload::json, n.metadata::json
        FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads, p_metadata)
             WITH ORDINALITY AS n(event_id, event_type, schema_version, payload, metadata, ord)
        RETURNING keel.events.position, keel.events.commit, keel.events.version
    )
    SELECT 0::smallint, v_current + v_count, v_current + 1,
           array_agg(i.position ORDER BY i.version),
           array_agg(i.commit ORDER BY i.version),
           NULL::uuid
    FROM inserted i;

    IF p_notify THEN
        PERFORM pg_notify('keel_events', '');
    END IF;
END
$$;

-- After restoring a dump into a new cluster, transaction ids start again
-- below the commit keys already stored. Run this once, before any writer
-- starts, to move new commit keys above every stored one.
CREATE FUNCTION keel.rebase_commit_order() RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    v_offset bigint;
BEGIN
    SELECT greatest(keel.commit_offset(),
                    coalesce(max(commit), 0) + 1 - pg_current_xact_id()::text::bigint)
        INTO v_offset FROM keel.events;
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION keel.commit_offset() RETURNS bigint '
        'LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
        format('SELECT %s::bigint', v_offset));
    RETURN v_offset;
END
$$;

CREATE TABLE keel.snapshots (
    stream_id      text PRIMARY KEY,
    version        bigint NOT NULL CHECK (version > 0),
    schema_version integer NOT NULL,
    state          json NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE keel.subscription_checkpoints (
    name       text PRIMARY KEY CHECK (name <> ''),
    commit     bigint NOT NULL,
    sequence   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
