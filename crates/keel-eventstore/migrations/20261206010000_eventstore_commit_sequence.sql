-- keel-eventstore: commit keys from a sequence, and a read horizon that only
-- this database's appenders can hold back. See docs/event-store.md
-- ("The read horizon").
--
-- Until now an event's commit key was its transaction's id (xid8) and the
-- read horizon was the cluster-wide xmin of a fresh snapshot: any
-- transaction holding an xid anywhere on the cluster, in any database, held
-- every reader back for as long as it stayed open. Now:
--
-- * commit keys come from keel.commit_seq, one key per append statement,
--   taken when the statement runs (keel.next_commit());
-- * the first time a transaction takes a key, it publishes that key as a
--   transaction-level advisory lock, which every session can see in
--   pg_locks (lock state is not MVCC);
-- * the horizon (keel.commit_horizon()) is the lowest key published by an
--   open transaction of this database, or one past the last key handed out.
--
-- Advisory lock names (two-int4 form, so pg_locks shows objsubid = 2; a
-- service's own bigint advisory locks have objsubid = 1 and never collide):
--   gate: (1262878720 = x'4B460000', backend pid)  taken before the key
--   key:  (1262813184 = x'4B450000' + bits 32..47 of the key, bits 0..31)
-- Keys are therefore limited to 48 bits (the sequence's MAXVALUE); at a
-- million appends a second that lasts about nine years past the start.

CREATE SEQUENCE keel.commit_seq AS bigint
    MINVALUE 1 MAXVALUE 281474976710655 CACHE 1 NO CYCLE;

-- The commit key of the calling append statement.
--
-- The first call in a transaction (or in a savepoint rolled back since)
-- takes the gate lock, then a key, then publishes the key; the setting
-- keel.commit_key_published remembers it until the transaction (or the
-- savepoint) ends, exactly as long as the locks live. Later calls take a
-- fresh key: keys only grow, and the published first key bounds them all
-- from below.
CREATE FUNCTION keel.next_commit() RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_key bigint;
    v_low bigint;
BEGIN
    IF coalesce(current_setting('keel.commit_key_published', true), '') <> '' THEN
        RETURN nextval('keel.commit_seq');
    END IF;
    -- Shared locks: they only need to be seen, never to exclude anyone.
    PERFORM pg_advisory_xact_lock_shared(1262878720, pg_backend_pid());
    v_key := nextval('keel.commit_seq');
    v_low := v_key & 4294967295;
    PERFORM pg_advisory_xact_lock_shared(
        (1262813184 + (v_key >> 32))::integer,
        (CASE WHEN v_low >= 2147483648 THEN v_low - 4294967296 ELSE v_low END)::integer);
    PERFORM set_config('keel.commit_key_published', v_key::text, true);
    RETURN v_key;
END
$$;

-- A row inserted without a commit key (by hand, or by an older binary's
-- statement) still gets a correct one; Keel's own appends pass one key per
-- statement explicitly.
ALTER TABLE keel.events ALTER COLUMN commit SET DEFAULT keel.next_commit();

-- That ALTER TABLE holds keel.events exclusively until the migration
-- commits: writers that still hold keys of the old kind have finished, and
-- no new append starts before the switch. Start the sequence above every
-- stored key and above what the old scheme would hand out now, so old and
-- new keys stay in one order across the upgrade.
SELECT setval('keel.commit_seq',
              greatest((SELECT coalesce(max(commit), 0) FROM keel.events),
                       pg_current_xact_id()::text::bigint + keel.commit_offset(),
                       1),
              true);

-- The first key of every open appending transaction of this database, with
-- its backend; a NULL key marks a transaction that holds the gate but has
-- not published its key yet (between nextval and the key lock).
CREATE FUNCTION keel.commit_holders()
RETURNS TABLE (pid integer, first_commit bigint)
    LANGUAGE sql VOLATILE AS $$
    SELECT max(l.pid), min(CASE WHEN l.classid::bigint < 1262878720
                                THEN ((l.classid::bigint - 1262813184) << 32) | l.objid::bigint END)
    FROM pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.objsubid = 2
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
      AND l.classid::bigint BETWEEN 1262813184 AND 1262878720
      -- a gate still queued for behind someone else's lock has taken no key
      AND (l.granted OR l.classid::bigint < 1262878720)
    GROUP BY l.virtualtransaction
$$;

-- Every event with a commit key below the returned value is in a committed
-- transaction, and nothing can be stored below it any more. NULL means
-- "unknown for a moment" (a writer is between taking its first key and
-- publishing it): read nothing new and ask again.
--
-- Call it in its own statement BEFORE the statement that reads with it
-- (under READ COMMITTED), never inside the reading statement: a transaction
-- that commits between that statement's snapshot and the lock read would
-- be below the horizon yet invisible to the read.
--
-- Order matters: the last handed-out key N is read first, the locks second.
-- A writer whose first key is <= N took its gate before that key, so it is
-- either still in pg_locks (gate and key, or gate only: NULL) or has ended;
-- a transaction's locks are released only after its commit is visible to
-- new snapshots. A writer whose first key is > N cannot store below N + 1.
CREATE OR REPLACE FUNCTION keel.commit_horizon() RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_last    bigint;
    v_low     bigint;
    v_unknown boolean;
BEGIN
    -- A standby sees neither the primary's advisory locks nor its exact
    -- sequence position (only the value logged ahead): a horizon computed
    -- there could pass a transaction still in flight on the primary.
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'the event log''s read horizon can only be computed on the primary'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    FOR attempt IN 1..20 LOOP
        SELECT CASE WHEN s.is_called THEN s.last_value ELSE s.last_value - 1 END
            INTO v_last FROM keel.commit_seq s;
        SELECT min(h.first_commit), coalesce(bool_or(h.first_commit IS NULL), false)
            INTO v_low, v_unknown FROM keel.commit_holders() h;
        IF NOT v_unknown THEN
            RETURN least(coalesce(v_low, v_last + 1), v_last + 1);
        END IF;
        -- That window is a few microseconds long.
        PERFORM pg_sleep(0.001);
    END LOOP;
    RETURN NULL;
END
$$;

-- What holds the horizon back right now: the open appending transaction of
-- this database with the lowest first key (none: all columns NULL besides
-- the horizon and the last key).
CREATE FUNCTION keel.commit_horizon_status()
RETURNS TABLE (horizon bigint, last_commit bigint, holder_pid integer,
               holder_commit bigint, holder_age_seconds double precision)
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_horizon bigint := keel.commit_horizon();
BEGIN
    RETURN QUERY
    SELECT v_horizon,
           (SELECT CASE WHEN s.is_called THEN s.last_value ELSE s.last_value - 1 END
              FROM keel.commit_seq s),
           CASE WHEN h.first_commit IS NOT NULL THEN coalesce(h.pid, 0) END, h.first_commit,
           extract(epoch FROM clock_timestamp() - a.xact_start)::double precision
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (SELECT * FROM keel.commit_holders() c
                        WHERE c.first_commit IS NOT NULL
                        ORDER BY c.first_commit LIMIT 1) h ON true
    LEFT JOIN pg_stat_activity a ON a.pid = h.pid;
END
$$;

-- After restoring a dump the sequence comes back with its value; if it did
-- not (a data-only restore, a copy of the table alone), this moves it above
-- every stored key. Safe at any time: it waits for open appenders, keeps
-- new ones out until it commits, and never moves the sequence backwards.
-- Returns the last key handed out afterwards.
CREATE OR REPLACE FUNCTION keel.rebase_commit_order() RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
BEGIN
    LOCK TABLE keel.events IN SHARE MODE;
    SELECT greatest((SELECT CASE WHEN s.is_called THEN s.last_value ELSE s.last_value - 1 END
                       FROM keel.commit_seq s),
                    (SELECT coalesce(max(e.commit), 0) FROM keel.events e),
                    1)
        INTO v_last;
    RETURN setval('keel.commit_seq', v_last, true);
END
$$;

-- The slow append path: as before, with one commit key per insert attempt,
-- taken after the stream's head was read (so a later version always gets a
-- larger key than the version it follows).
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
    v_commit     bigint;
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

        -- Taken after the head was read: the version this batch follows was
        -- committed before this key was handed out, so its key is smaller.
        v_commit := keel.next_commit();
        BEGIN
            WITH inserted AS (
                INSERT INTO keel.events
                    (commit, event_id, stream_id, version, event_type, schema_version, payload,
                     metadata)
                SELECT v_commit, n.event_id, p_stream_id, v_current + n.ord, n.event_type,
                       n.schema_version, n.payload::json, n.metadata::json
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
