-- keel-security: cheaper appends and sealing for the audit log.
-- See docs/security.md, "Audit log", and docs/benchmarks-security.md.
--
-- Since 20261124090000 a command writes its audit record as an unsealed
-- row in its own transaction and a chainer seals committed rows into the
-- hash chain afterwards. Measured, three server-side costs were left:
--
-- 1. The command's INSERT went into eight indexes, five of them serving
--    queries and chain look-ups that only ever read sealed rows. Those
--    indexes are now partial (sequence IS NOT NULL): an unsealed row is
--    entered only where the append itself needs it (the primary key, the
--    (command_id, content_hash) uniqueness that makes appends idempotent,
--    and the chainer's work list), and reaches the others when it is
--    sealed. Every statement that reads sealed rows compares sequence with
--    a strict operator (sequence = $n, sequence > $n), which lets the
--    planner use a partial index whatever the parameter.
-- 2. Sealing moved the head once per row, and the guard trigger built two
--    JSON documents of the whole row per sealed row. The head now moves
--    once per sealing call, to the last row it sealed, and the guard
--    compares the row itself (see below), with the same guarantees.
-- 3. (The chainer's batching is in the Rust code.)

-- 1. Partial indexes: only sealed rows are queried through these.
ALTER TABLE keel.audit_log DROP CONSTRAINT audit_log_sequence_key;
-- Unique as before (NULLs never conflicted; unsealed rows are now simply
-- not in it).
CREATE UNIQUE INDEX audit_log_sequence_key ON keel.audit_log (sequence)
    WHERE sequence IS NOT NULL;

DROP INDEX keel.audit_log_principal_idx;
CREATE INDEX audit_log_principal_idx ON keel.audit_log (principal, sequence)
    WHERE principal IS NOT NULL AND sequence IS NOT NULL;

DROP INDEX keel.audit_log_aggregate_idx;
CREATE INDEX audit_log_aggregate_idx ON keel.audit_log (aggregate_kind, aggregate_id, sequence)
    WHERE aggregate_kind IS NOT NULL AND sequence IS NOT NULL;

DROP INDEX keel.audit_log_occurred_at_idx;
CREATE INDEX audit_log_occurred_at_idx ON keel.audit_log (occurred_at, sequence)
    WHERE sequence IS NOT NULL;

-- Appends no longer look a command up by this index (the unique
-- audit_log_attempt_key does); it stays for operators searching the chain
-- by command id.
DROP INDEX keel.audit_log_command_id_idx;
CREATE INDEX audit_log_command_id_idx ON keel.audit_log (command_id, sequence)
    WHERE command_id IS NOT NULL AND sequence IS NOT NULL;

-- 2. The guard. Still append-only: DELETE, and any UPDATE, are refused,
-- except sealing an unsealed row, once: setting its chain columns, and
-- nothing else, at the position right after the chain's last record,
-- linked to it. The last record is the head's, or, while a sealing call
-- is under way (the head moves at its end), the row that call sealed just
-- before. Whoever seals holds the head's lock, and a sealed row can never
-- change again, so every sealed row past the head links back to it: the
-- chain cannot fork (the unique sequence index) and has no gap.
--
-- "Nothing else changes" is checked on the whole row: NEW with its chain
-- columns put back to OLD's (all NULL on an unsealed row) must equal OLD,
-- column by column, NULL matching NULL, so a column added later is guarded
-- without touching this function.
CREATE OR REPLACE FUNCTION keel.guard_audit_log() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    content keel.audit_log;
    head keel.audit_head;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.sequence IS NULL AND NEW.sequence IS NOT NULL THEN
        content := NEW;
        content.sequence := OLD.sequence;
        content.recorded_at := OLD.recorded_at;
        content.prev_hash := OLD.prev_hash;
        content.hash := OLD.hash;
        content.mac_key_id := OLD.mac_key_id;
        content.mac := OLD.mac;
        IF content IS NOT DISTINCT FROM OLD THEN
            SELECT * INTO head FROM keel.audit_head h WHERE h.singleton;
            IF (NEW.sequence = head.sequence + 1 AND NEW.prev_hash = head.hash)
               OR (NEW.sequence > head.sequence + 1
                   AND EXISTS (SELECT 1 FROM keel.audit_log l
                               WHERE l.sequence = NEW.sequence - 1
                                 AND l.hash = NEW.prev_hash)) THEN
                RETURN NEW;
            END IF;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
END
$$;

-- The head only moves forward, to a sealed record. Every sealed record
-- past the old head links back to it (the guard above), so the records
-- the head passes over form an unbroken chain from the old head to the
-- new one.
CREATE OR REPLACE FUNCTION keel.check_audit_head() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE'
       OR NEW.singleton IS DISTINCT FROM OLD.singleton
       OR NOT NEW.sequence > OLD.sequence
       OR NOT EXISTS (SELECT 1 FROM keel.audit_log l
                      WHERE l.sequence = NEW.sequence
                        AND l.hash = NEW.hash) THEN
        RAISE EXCEPTION 'audit_head only advances to a record appended after it: % is not allowed', TG_OP
            USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NEW;
END
$$;

-- Seals a group of unsealed rows in order, in one round trip, then moves
-- the head once, onto the last. The caller holds the head's row lock and
-- computed every hash from the head it read. p_seals is a JSON array of
-- objects {id, sequence, recorded_at, prev_hash, hash, mac_key_id, mac}
-- (timestamps as ISO 8601 text with microseconds), in chain order.
CREATE OR REPLACE FUNCTION keel.seal_audit_records(p_seals jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    sealed bigint := 0;
BEGIN
    FOR s IN SELECT x.*
             FROM ROWS FROM (jsonb_to_recordset(p_seals)
                             AS (id bigint, sequence bigint, recorded_at timestamptz,
                                 prev_hash text, hash text, mac_key_id text, mac text))
                  WITH ORDINALITY AS x(id, sequence, recorded_at, prev_hash, hash,
                                       mac_key_id, mac, n)
             ORDER BY x.n LOOP
        UPDATE keel.audit_log
            SET sequence = s.sequence, recorded_at = s.recorded_at,
                prev_hash = s.prev_hash, hash = s.hash,
                mac_key_id = s.mac_key_id, mac = s.mac
            WHERE id = s.id AND sequence IS NULL;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'audit row % is not waiting to be sealed', s.id;
        END IF;
        sealed := sealed + 1;
    END LOOP;
    IF sealed > 0 THEN
        -- s is the last row sealed.
        UPDATE keel.audit_head
            SET sequence = s.sequence, hash = s.hash, recorded_at = s.recorded_at
            WHERE singleton;
    END IF;
END
$$;
