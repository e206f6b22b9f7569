-- keel-security: audit records are written unchained, in the caller's
-- transaction, and sealed into the hash chain after they committed.
-- See docs/security.md, "Audit log".
--
-- Until now an append locked keel.audit_head, so every writer waited for
-- the one before it, and the record could not join the command's own
-- transaction without serialising all commands on that lock. Now:
--
-- 1. An append inserts a row with its content only (chain columns NULL),
--    in whatever transaction the caller runs, without touching the head.
-- 2. A chainer takes the head's lock in a short transaction of its own,
--    reads the committed unsealed rows (uncommitted ones are invisible to
--    it, so a late commit is simply sealed by a later round), gives each
--    the next sequence, recorded_at, prev_hash, hash and, in keyed mode, its
--    MAC, and moves the head along. Sequences stay gapless and the chain
--    never forks: sealing is serialised by the head's lock, appending is
--    not.

-- Every row gets a row identity; sequence, the chain position, is set
-- when the row is sealed.
ALTER TABLE keel.audit_log DROP CONSTRAINT audit_log_pkey;
ALTER TABLE keel.audit_log
    ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY,
    ALTER COLUMN sequence DROP NOT NULL,
    ALTER COLUMN recorded_at DROP NOT NULL,
    ALTER COLUMN prev_hash DROP NOT NULL,
    ALTER COLUMN hash DROP NOT NULL;
ALTER TABLE keel.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id),
    ADD CONSTRAINT audit_log_sequence_key UNIQUE (sequence),
    -- A row is either unsealed (no chain column set) or sealed (all of
    -- sequence, recorded_at, prev_hash and hash set; the MAC in keyed mode).
    ADD CONSTRAINT audit_log_seal_check CHECK (
        (sequence IS NULL) = (recorded_at IS NULL)
        AND (sequence IS NULL) = (prev_hash IS NULL)
        AND (sequence IS NULL) = (hash IS NULL)
        AND (sequence IS NOT NULL OR mac IS NULL));

-- The chainer's work list.
CREATE INDEX audit_log_unsealed_idx ON keel.audit_log (id) WHERE sequence IS NULL;

-- Idempotency without the head's lock: content_hash is the SHA-256 of the
-- entry's canonical encoding (keel_security computes it), and one command
-- id holds each content once. A second identical append, even from a
-- concurrent transaction, finds the first (ON CONFLICT DO NOTHING; while
-- the first is uncommitted the second waits for its outcome). Rows written
-- before this migration have no content_hash: NULLs never conflict, so the
-- index builds on any existing log (see 20261123190000), and a retry of an
-- append made before the upgrade is stored as another attempt.
ALTER TABLE keel.audit_log
    ADD COLUMN content_hash text,
    ADD CONSTRAINT audit_log_content_hash_check CHECK (content_hash ~ '^[0-9a-f]{64}$');
CREATE UNIQUE INDEX audit_log_attempt_key ON keel.audit_log (command_id, content_hash)
    WHERE content_hash IS NOT NULL;

-- Still append-only: DELETE, and any UPDATE, are refused, except sealing
-- an unsealed row, once: setting its chain columns, and nothing else, to
-- the position right after the head (so rows are sealed in chain order,
-- by whoever holds the head's lock).
CREATE FUNCTION keel.guard_audit_log() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    chain CONSTANT text[] := '{sequence,recorded_at,prev_hash,hash,mac_key_id,mac}';
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.sequence IS NULL
       AND NEW.sequence IS NOT NULL
       AND (to_jsonb(NEW) - chain) = (to_jsonb(OLD) - chain)
       AND EXISTS (SELECT 1 FROM keel.audit_head h
                   WHERE h.singleton
                     AND h.sequence + 1 = NEW.sequence
                     AND h.hash = NEW.prev_hash) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
END
$$;

DROP TRIGGER audit_log_append_only ON keel.audit_log;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON keel.audit_log
    FOR EACH ROW EXECUTE FUNCTION keel.guard_audit_log();

-- Seals a group of unsealed rows in order, moving the head onto each in
-- turn, in one round trip. The caller holds the head's row lock and
-- computed every hash from the head it read. p_seals is a JSON array of
-- objects {id, sequence, recorded_at, prev_hash, hash, mac_key_id, mac}
-- (timestamps as ISO 8601 text with microseconds).
CREATE FUNCTION keel.seal_audit_records(p_seals jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s jsonb;
BEGIN
    FOR s IN SELECT value FROM jsonb_array_elements(p_seals) LOOP
        UPDATE keel.audit_log
            SET sequence = (s->>'sequence')::bigint,
                recorded_at = (s->>'recorded_at')::timestamptz,
                prev_hash = s->>'prev_hash', hash = s->>'hash',
                mac_key_id = s->>'mac_key_id', mac = s->>'mac'
            WHERE id = (s->>'id')::bigint AND sequence IS NULL;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'audit row % is not waiting to be sealed', s->>'id';
        END IF;
        UPDATE keel.audit_head
            SET sequence = (s->>'sequence')::bigint, hash = s->>'hash',
                recorded_at = (s->>'recorded_at')::timestamptz
            WHERE singleton;
    END LOOP;
END
$$;
