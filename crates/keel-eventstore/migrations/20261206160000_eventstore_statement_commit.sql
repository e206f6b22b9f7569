-- keel-eventstore: a cheaper commit key for appends that are a transaction
-- of their own. See docs/event-store.md ("What an append costs").
--
-- keel.next_commit() remembers in a setting that its transaction has
-- published its first key, so later appends of the same transaction skip
-- the two advisory locks. An autocommit append is one statement and one
-- transaction: it always takes the first-key path, and reading and writing
-- that setting is pure overhead there. keel.take_commit() does the same
-- publication without the setting: take the gate lock, take a key, publish
-- the key. Calling it more than once in a transaction is still correct
-- (each key is published; the horizon uses a transaction's lowest), only
-- dearer; Keel calls it from its one-statement appends alone.

CREATE FUNCTION keel.take_commit() RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_key bigint;
    v_low bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1262878720, pg_backend_pid());
    v_key := nextval('keel.commit_seq');
    v_low := v_key & 4294967295;
    PERFORM pg_advisory_xact_lock_shared(
        (1262813184 + (v_key >> 32))::integer,
        (CASE WHEN v_low >= 2147483648 THEN v_low - 4294967296 ELSE v_low END)::integer);
    RETURN v_key;
END
$$;
