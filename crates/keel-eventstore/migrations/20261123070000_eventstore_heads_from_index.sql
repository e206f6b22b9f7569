-- keel-eventstore: a stream's version is read from its events, not kept in a
-- separate head row. See docs/event-store.md ("Appending").
--
-- Until now every append moved the stream's row in keel.streams, a second
-- write (and a second index update and WAL record) per append that cost
-- about a fifth of a single-event append. The unique index on
-- (stream_id, version) already makes two writers of the same version
-- collide, so the head row added no safety: an append now checks its
-- expectation against the newest stored version and lets the index refuse a
-- writer that lost a race.

-- Appends a batch to one stream (the slow path: conflicts, idempotent
-- retries, reused ids, and appends inside a caller's transaction).
--
-- p_expected_mode: 0 any, 1 no stream, 2 stream exists, 3 exact (p_expected).
-- Returns one row: outcome 0 = appended, 1 = already stored by an earlier
-- identical append (idempotent retry), 2 = version conflict, 3 = an event id
-- is already used by a different event (see conflicting_event_id).
CREATE OR REPLACE FUNCTION keel.append_events(
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
    v_current    bigint;
    v_tried      bigint;
    v_count      integer := cardinality(p_event_ids);
    v_existing   integer;
    v_first      bigint;
    v_matches    integer;
    v_bad        uuid;
    v_positions  bigint[];
    v_commits    bigint[];
    v_constraint text;
BEGIN
    LOOP
        SELECT coalesce(max(e.version), 0) INTO v_current
            FROM keel.events e WHERE e.stream_id = p_stream_id;
        IF v_tried IS NOT NULL AND v_current <= v_tried THEN
            -- The insert collided with a version this transaction's
            -- snapshot cannot see (REPEATABLE READ or SERIALIZABLE caller):
            -- only a new transaction can decide.
            RAISE EXCEPTION 'stream % was appended to by a concurrent transaction', p_stream_id
                USING ERRCODE = 'serialization_failure';
        END IF;

        -- Are any of these ids stored already? Only then is this a retry (or
        -- a misuse), so the common path costs one index probe per event.
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
                -- every stored id matches, but only part of the batch is
                -- stored or it was stored under another expectation
                SELECT n.event_id INTO v_bad
                    FROM unnest(p_event_ids) WITH ORDINALITY AS n(event_id, ord)
                    JOIN keel.events e ON e.event_id = n.event_id
                    ORDER BY n.ord LIMIT 1;
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

        BEGIN
            WITH inserted AS (
                INSERT INTO keel.events
                    (event_id, stream_id, version, event_type, schema_version, payload, metadata)
                SELECT n.event_id, p_stream_id, v_current + n.ord, n.event_type, n.schema_version,
                       n.payload::json, n.metadata::json
                FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads, p_metadata)
                     WITH ORDINALITY AS n(event_id, event_type, schema_version, payload, metadata, ord)
                RETURNING keel.events.position, keel.events.commit, keel.events.version
            )
            SELECT array_agg(i.position ORDER BY i.version), array_agg(i.commit ORDER BY i.version)
                INTO v_positions, v_commits
                FROM inserted i;
            EXIT;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
            IF v_constraint IS DISTINCT FROM 'events_stream_version_key' THEN
                RAISE;
            END IF;
            -- A concurrent writer took these versions (this insert waited
            -- for it to commit). Decide again from the new head: an exact
            -- expectation now fails, an open one moves on, and a writer that
            -- stored these very events makes this an idempotent retry.
            v_tried := v_current;
        END;
    END LOOP;

    IF p_notify THEN
        PERFORM pg_notify('keel_events', '');
    END IF;
    RETURN QUERY SELECT 0::smallint, v_current + v_count, v_current + 1, v_positions, v_commits, NULL::uuid;
END
$$;

DROP TABLE keel.streams;
