-- keel-security: a narrow table for records waiting to be sealed.
-- See docs/security.md, "Audit log", and docs/benchmarks-security.md
-- ("A narrow pending table").
--
-- Until now a command wrote its audit record as an unsealed row of
-- keel.audit_log, in its own transaction, and a chainer sealed it there
-- (UPDATE) later. Measured, that INSERT cost more server time than a
-- whole extra statement in the handler: a wide row with typed columns,
-- three index entries and ON CONFLICT's speculative insertion. Now:
--
-- 1. A command inserts its record into keel.audit_pending: one jsonb
--    document (the record's content, with the columns of keel.audit_log
--    as keys, and its content_hash) under an id, nothing else. One index
--    entry (the primary key, always appended at its right edge), no
--    conflict check.
-- 2. A chainer, holding the head's lock, reads committed pending rows,
--    drops those that repeat a stored attempt (same command_id and
--    content_hash: a retried append), computes the chain columns, and
--    moves the rest into keel.audit_log in one INSERT … SELECT, deletes
--    them from keel.audit_pending and moves the head once
--    (keel.seal_pending_audit_records). Sealed rows keep the id they had
--    while pending (both tables draw ids from audit_log's identity), so
--    an append can find its record by id.
--
-- keel.audit_log's own unsealed rows (the old layout) are carried over
-- below. The old sealing path (UPDATE of an unsealed row,
-- keel.seal_audit_records) still works, so processes of the previous
-- release that are still running during an upgrade keep sealing the rows
-- they write, under the same head lock.

CREATE TABLE keel.audit_pending (
    id    bigint NOT NULL,
    entry jsonb NOT NULL,
    CONSTRAINT audit_pending_pkey PRIMARY KEY (id)
);

-- Ids come from keel.audit_log's identity sequence, so a pending row and
-- the sealed row it becomes share one id, unique across both tables.
DO $$
BEGIN
    EXECUTE format('ALTER TABLE keel.audit_pending ALTER COLUMN id SET DEFAULT nextval(%L::regclass)',
                   pg_get_serial_sequence('keel.audit_log', 'id'));
END
$$;

-- A pending record is evidence too: it may not change, and it may leave
-- the table only once it is in the chain (a sealed row with its id), or
-- when the attempt it repeats is stored already (same command_id and
-- content_hash, sealed or not). TRUNCATE is refused. The check runs once
-- per statement over the deleted rows (a transition table), not once per
-- row, so a sealing call pays one set-based query for its whole batch.
CREATE FUNCTION keel.guard_audit_pending_delete() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM gone o
               WHERE NOT EXISTS (SELECT 1 FROM keel.audit_log l
                                 WHERE l.id = o.id AND l.sequence IS NOT NULL)
                 AND NOT EXISTS (SELECT 1 FROM keel.audit_log l
                                 WHERE l.command_id = (o.entry->>'command_id')::uuid
                                   AND l.content_hash = o.entry->>'content_hash'
                                   AND l.id <> o.id)) THEN
        RAISE EXCEPTION '% is append-only: only records in the chain may leave it', TG_TABLE_NAME
            USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER audit_pending_delete_guard
    AFTER DELETE ON keel.audit_pending
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION keel.guard_audit_pending_delete();

CREATE TRIGGER audit_pending_no_update
    BEFORE UPDATE ON keel.audit_pending
    FOR EACH STATEMENT EXECUTE FUNCTION keel.refuse_audit_mutation();

CREATE TRIGGER audit_pending_no_truncate
    BEFORE TRUNCATE ON keel.audit_pending
    FOR EACH STATEMENT EXECUTE FUNCTION keel.refuse_audit_mutation();

-- A row inserted into keel.audit_log sealed must sit past the head and
-- link to the record right before it: the head's record, or another row
-- sealed past the head (in the same sealing call: the head moves at its
-- end, and only whoever holds the head's lock seals). Checked once per
-- statement, after it, over the inserted rows: each row's predecessor is
-- then in the table, whether it came before or with the statement.
-- Unsealed inserts (the old layout) are still allowed; the UPDATE guard
-- checks their sealing.
CREATE FUNCTION keel.guard_audit_log_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1
               FROM added n
               CROSS JOIN keel.audit_head h
               LEFT JOIN keel.audit_log p ON p.sequence = n.sequence - 1
               WHERE h.singleton AND n.sequence IS NOT NULL
                 -- COALESCE: a missing predecessor (NULL) fails the row.
                 AND NOT COALESCE((n.sequence = h.sequence + 1 AND n.prev_hash = h.hash)
                                  OR (n.sequence > h.sequence + 1 AND p.hash = n.prev_hash),
                                  false)) THEN
        RAISE EXCEPTION '% is append-only: a record may only be added right after the chain''s last', TG_TABLE_NAME
            USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER audit_log_insert_guard
    AFTER INSERT ON keel.audit_log
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION keel.guard_audit_log_insert();

-- Seals pending rows: p_seals holds, in chain order, the chain columns of
-- each row to seal ({id, sequence, recorded_at, prev_hash, hash,
-- mac_key_id, mac}, timestamps as ISO 8601 text with microseconds); the
-- content comes from the pending row itself. p_done lists every pending
-- row the call consumes: the sealed ones and the repeats dropped. The head
-- then moves once, onto the last sealed row. The caller holds the head's
-- row lock and computed every hash from the head it read and the pending
-- content it read under that lock.
CREATE FUNCTION keel.seal_pending_audit_records(p_seals jsonb, p_done bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wanted bigint := jsonb_array_length(p_seals);
    sealed bigint;
    last_sequence bigint;
    last_hash text;
    last_recorded_at timestamptz;
BEGIN
    INSERT INTO keel.audit_log
        (id, sequence, occurred_at, recorded_at, principal, tenant, command_id, command_type,
         event_types, aggregate_kind, aggregate_id, outcome, outcome_code, outcome_reason,
         correlation_id, details, prev_hash, hash, mac_key_id, mac, content_hash)
    OVERRIDING SYSTEM VALUE
    SELECT p.id, s.sequence, c.occurred_at, s.recorded_at, c.principal, c.tenant,
           c.command_id, c.command_type, c.event_types, c.aggregate_kind, c.aggregate_id,
           c.outcome, c.outcome_code, c.outcome_reason, c.correlation_id, p.entry->'details',
           s.prev_hash, s.hash, s.mac_key_id, s.mac, c.content_hash
    FROM ROWS FROM (jsonb_to_recordset(p_seals)
                    AS (id bigint, sequence bigint, recorded_at timestamptz, prev_hash text,
                        hash text, mac_key_id text, mac text))
         WITH ORDINALITY AS s(id, sequence, recorded_at, prev_hash, hash, mac_key_id, mac, n)
    JOIN keel.audit_pending p ON p.id = s.id
    CROSS JOIN LATERAL jsonb_populate_record(NULL::keel.audit_log, p.entry - 'details') AS c
    ORDER BY s.n;
    GET DIAGNOSTICS sealed = ROW_COUNT;
    IF sealed <> wanted THEN
        RAISE EXCEPTION 'sealing % audit records found only % of them pending', wanted, sealed;
    END IF;
    DELETE FROM keel.audit_pending WHERE id = ANY (p_done);
    IF sealed > 0 THEN
        SELECT x.sequence, x.hash, x.recorded_at
            INTO last_sequence, last_hash, last_recorded_at
            FROM jsonb_to_record(p_seals -> (wanted::int - 1))
                 AS x(sequence bigint, hash text, recorded_at timestamptz);
        UPDATE keel.audit_head
            SET sequence = last_sequence, hash = last_hash, recorded_at = last_recorded_at
            WHERE singleton;
    END IF;
END
$$;

-- Carry over keel.audit_log's unsealed rows (the old layout) as pending
-- rows under the same ids, in their order. The guard refuses DELETE on
-- keel.audit_log, so it is switched off for this one statement, inside
-- this migration's transaction.
INSERT INTO keel.audit_pending (id, entry)
SELECT l.id,
       jsonb_strip_nulls(jsonb_build_object(
           'occurred_at', l.occurred_at, 'principal', l.principal, 'tenant', l.tenant,
           'command_id', l.command_id, 'command_type', l.command_type,
           'event_types', to_jsonb(l.event_types), 'aggregate_kind', l.aggregate_kind,
           'aggregate_id', l.aggregate_id, 'outcome', l.outcome,
           'outcome_code', l.outcome_code, 'outcome_reason', l.outcome_reason,
           'correlation_id', l.correlation_id, 'content_hash', l.content_hash))
       || jsonb_build_object('details', l.details)
FROM keel.audit_log l
WHERE l.sequence IS NULL
ORDER BY l.id;

ALTER TABLE keel.audit_log DISABLE TRIGGER audit_log_append_only;
DELETE FROM keel.audit_log WHERE sequence IS NULL;
ALTER TABLE keel.audit_log ENABLE TRIGGER audit_log_append_only;
