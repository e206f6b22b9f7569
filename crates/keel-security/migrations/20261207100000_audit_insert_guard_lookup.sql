-- keel-security: the insert guard of keel.audit_log finds each sealed
-- row's predecessor without scanning the table.
-- See docs/benchmarks-security.md ("Sealing cost: the insert guard").
--
-- The guard (migration 20261207090000) joined the statement's inserted
-- rows to keel.audit_log on sequence. Its plan is made once per session
-- and kept, and in a session that started while keel.audit_log was small
-- (every new database, every chainer started early) it was a nested loop
-- that read the whole table once per inserted row: sealing a batch of 500
-- rows cost 16 ms against an empty log, 32 ms against 500 rows, and about
-- 200 microseconds per record with 12,800 rows sealed, growing with the
-- log. Same rule, two cheaper look-ups:
--
-- * a predecessor sealed by the same statement (the usual case: a sealing
--   call inserts a run of consecutive sequences) is the inserted row just
--   before it in sequence order, read with lag() over the transition
--   table: one sort of the statement's rows, no join for the planner to
--   get wrong (a self-join of the transition table was still planned as a
--   nested loop, 250,000 comparisons for 500 rows);
-- * any other predecessor (the head's record, or a row sealed past the head
--   earlier in the same sealing call) is looked up by its sequence, one
--   probe of the unique sequence index per such row.
--
-- The rule itself is unchanged: a row inserted sealed must sit right after
-- the head and link to the head's hash, or sit further on and link to the
-- hash of the row with the sequence right before its own.

CREATE OR REPLACE FUNCTION keel.guard_audit_log_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1
               FROM (SELECT a.sequence, a.prev_hash,
                            lag(a.sequence) OVER w AS before_sequence,
                            lag(a.hash) OVER w AS before_hash
                     FROM added a
                     WHERE a.sequence IS NOT NULL
                     WINDOW w AS (ORDER BY a.sequence)) n
               CROSS JOIN keel.audit_head h
               WHERE h.singleton
                 -- COALESCE: a missing predecessor (NULL) fails the row.
                 AND NOT COALESCE(
                     (n.sequence = h.sequence + 1 AND n.prev_hash = h.hash)
                     OR (n.sequence > h.sequence + 1
                         AND n.before_sequence = n.sequence - 1
                         AND n.before_hash = n.prev_hash)
                     OR (n.sequence > h.sequence + 1
                         AND n.before_sequence IS DISTINCT FROM n.sequence - 1
                         AND (SELECT p.hash FROM keel.audit_log p
                              WHERE p.sequence = n.sequence - 1) = n.prev_hash),
                     false)) THEN
        RAISE EXCEPTION '% is append-only: a record may only be added right after the chain''s last', TG_TABLE_NAME
            USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END
$$;
