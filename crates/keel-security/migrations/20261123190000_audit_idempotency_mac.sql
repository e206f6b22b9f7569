-- keel-security: idempotent audit appends and the keyed (HMAC) audit chain.
-- See docs/security.md, "Audit log".
--
-- 1. Appends are idempotent on command_id. The writer looks a command id up
--    while it holds the head's row lock, so the check needs no unique
--    constraint to be race-free; this index only makes the look-up cheap.
--    (A unique index would refuse to build on a database where the old,
--    non-idempotent append already stored a command twice; records can
--    never be removed, so such a database could never migrate.) The writer
--    returns the earliest record of a command id.
CREATE INDEX audit_log_command_id_idx ON keel.audit_log (command_id, sequence)
    WHERE command_id IS NOT NULL;

-- 2. Keyed mode: each record may carry an HMAC-SHA256 over its sequence and
--    hash, made with the key named by mac_key_id. Records written without a
--    key (and every record written before this migration) leave both NULL.
ALTER TABLE keel.audit_log
    ADD COLUMN mac_key_id text,
    ADD COLUMN mac text,
    ADD CONSTRAINT audit_log_mac_key_id_check
        CHECK (mac_key_id <> '' AND octet_length(mac_key_id) <= 64),
    ADD CONSTRAINT audit_log_mac_check CHECK (mac ~ '^[0-9a-f]{64}$'),
    ADD CONSTRAINT audit_log_mac_pair_check CHECK ((mac IS NULL) = (mac_key_id IS NULL));

-- The same group write as before, now also storing the MAC columns (absent
-- keys in p_records read as NULL, so an older writer still works).
CREATE OR REPLACE FUNCTION keel.append_audit_records(p_records jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_records) LOOP
        INSERT INTO keel.audit_log
            (sequence, occurred_at, recorded_at, principal, tenant, command_id, command_type,
             event_types, aggregate_kind, aggregate_id, outcome, outcome_code, outcome_reason,
             correlation_id, details, prev_hash, hash, mac_key_id, mac)
        VALUES
            ((r->>'sequence')::bigint, (r->>'occurred_at')::timestamptz,
             (r->>'recorded_at')::timestamptz, r->>'principal', r->>'tenant',
             (r->>'command_id')::uuid, r->>'command_type',
             ARRAY(SELECT jsonb_array_elements_text(r->'event_types')),
             r->>'aggregate_kind', r->>'aggregate_id', r->>'outcome', r->>'outcome_code',
             r->>'outcome_reason', (r->>'correlation_id')::uuid, r->'details',
             r->>'prev_hash', r->>'hash', r->>'mac_key_id', r->>'mac');
        UPDATE keel.audit_head
            SET sequence = (r->>'sequence')::bigint, hash = r->>'hash',
                recorded_at = (r->>'recorded_at')::timestamptz
            WHERE singleton;
    END LOOP;
END
$$;
