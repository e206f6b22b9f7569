-- keel-security: the tamper-evident audit log. Each record carries a SHA-256
-- hash over its sequence, content, recorded_at and the previous record's
-- hash, computed by the application (keel_security::audit::record_hash).
-- See docs/security.md, "Audit log".

CREATE TABLE keel.audit_log (
    sequence       bigint NOT NULL CHECK (sequence > 0),
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL,
    principal      text,
    tenant         text,
    command_id     uuid,
    command_type   text NOT NULL CHECK (command_type <> ''),
    event_types    text[] NOT NULL,
    aggregate_kind text,
    aggregate_id   text,
    outcome        text NOT NULL,
    outcome_code   text,
    outcome_reason text,
    correlation_id uuid,
    details        jsonb NOT NULL,
    prev_hash      text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    hash           text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    CONSTRAINT audit_log_pkey PRIMARY KEY (sequence),
    CONSTRAINT audit_log_aggregate_check
        CHECK ((aggregate_kind IS NULL) = (aggregate_id IS NULL)),
    CONSTRAINT audit_log_outcome_check CHECK (
        (outcome = 'accepted' AND outcome_code IS NULL AND outcome_reason IS NULL)
        OR (outcome = 'rejected' AND outcome_code IS NOT NULL AND outcome_reason IS NOT NULL)
        OR (outcome = 'failed' AND outcome_code IS NOT NULL AND outcome_reason IS NULL))
);

-- Queries filter by one of these and page by sequence.
CREATE INDEX audit_log_principal_idx ON keel.audit_log (principal, sequence)
    WHERE principal IS NOT NULL;
CREATE INDEX audit_log_aggregate_idx ON keel.audit_log (aggregate_kind, aggregate_id, sequence)
    WHERE aggregate_kind IS NOT NULL;
CREATE INDEX audit_log_occurred_at_idx ON keel.audit_log (occurred_at, sequence);

-- The chain's head: the latest record's sequence and hash in one row. An
-- append locks this row (SELECT … FOR UPDATE), so appends take sequences one
-- after another, without gaps, each linked to the one before: the chain
-- cannot fork. The row also lets verification notice records cut from the
-- end of the log, unless the head was rewound too (see docs/security.md).
CREATE TABLE keel.audit_head (
    singleton   boolean NOT NULL DEFAULT true,
    sequence    bigint NOT NULL CHECK (sequence >= 0),
    hash        text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    recorded_at timestamptz,
    CONSTRAINT audit_head_pkey PRIMARY KEY (singleton),
    CONSTRAINT audit_head_singleton_check CHECK (singleton)
);

INSERT INTO keel.audit_head (singleton, sequence, hash, recorded_at)
    VALUES (true, 0, repeat('0', 64), NULL);

-- Audit records are evidence: the database refuses to change or remove them.
CREATE FUNCTION keel.refuse_audit_mutation() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON keel.audit_log
    FOR EACH ROW EXECUTE FUNCTION keel.refuse_audit_mutation();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON keel.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION keel.refuse_audit_mutation();

-- The head only moves forward, one stored record at a time.
CREATE FUNCTION keel.check_audit_head() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE'
       OR NEW.singleton IS DISTINCT FROM OLD.singleton
       OR NEW.sequence <> OLD.sequence + 1
       OR NOT EXISTS (SELECT 1 FROM keel.audit_log l
                      WHERE l.sequence = NEW.sequence
                        AND l.hash = NEW.hash
                        AND l.prev_hash = OLD.hash) THEN
        RAISE EXCEPTION 'audit_head only advances to the record appended after it: % is not allowed', TG_OP
            USING ERRCODE = 'KL003', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_head_forward_only
    BEFORE INSERT OR UPDATE OR DELETE ON keel.audit_head
    FOR EACH ROW EXECUTE FUNCTION keel.check_audit_head();

CREATE TRIGGER audit_head_no_truncate
    BEFORE TRUNCATE ON keel.audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION keel.refuse_audit_mutation();

-- Writes a group of records in order, moving the head onto each in turn, in
-- one round trip. The caller holds the head's row lock (taken with
-- SELECT … FOR UPDATE in the same transaction) and computed every hash from
-- the head it read. p_records is a JSON array of objects with the columns
-- of keel.audit_log as keys (timestamps as ISO 8601 text with microseconds).
CREATE FUNCTION keel.append_audit_records(p_records jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_records) LOOP
        INSERT INTO keel.audit_log
            (sequence, occurred_at, recorded_at, principal, tenant, command_id, command_type,
             event_types, aggregate_kind, aggregate_id, outcome, outcome_code, outcome_reason,
             correlation_id, details, prev_hash, hash)
        VALUES
            ((r->>'sequence')::bigint, (r->>'occurred_at')::timestamptz,
             (r->>'recorded_at')::timestamptz, r->>'principal', r->>'tenant',
             (r->>'command_id')::uuid, r->>'command_type',
             ARRAY(SELECT jsonb_array_elements_text(r->'event_types')),
             r->>'aggregate_kind', r->>'aggregate_id', r->>'outcome', r->>'outcome_code',
             r->>'outcome_reason', (r->>'correlation_id')::uuid, r->'details',
             r->>'prev_hash', r->>'hash');
        UPDATE keel.audit_head
            SET sequence = (r->>'sequence')::bigint, hash = r->>'hash',
                recorded_at = (r->>'recorded_at')::timestamptz
            WHERE singleton;
    END LOOP;
END
$$;
