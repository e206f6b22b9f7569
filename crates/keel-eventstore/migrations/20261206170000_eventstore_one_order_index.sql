-- keel-eventstore: one index for the global order and the row identity.
-- See docs/event-store.md ("What an append writes, and why each part is
-- kept").
--
-- keel.events had both a primary key on position and a non-unique index on
-- (commit, position) for the global log's keyset reads. No statement looks
-- an event up by position alone: the global log reads by (commit,
-- position), streams by (stream_id, version), retries by event_id. Making
-- (commit, position) the primary key keeps every guarantee (position is
-- still an identity, and the pair is unique because position is) and saves
-- one index entry, its WAL record and its page splits on every event
-- appended.
--
-- Upgrading builds the unique index while keel.events is locked against
-- writes: on a large store, run it in a maintenance window.

-- The table stays locked from the first statement to the commit: no row
-- can be written while the old key is gone and the new one not yet built.
ALTER TABLE keel.events DROP CONSTRAINT events_pkey;
CREATE UNIQUE INDEX events_pkey ON keel.events (commit, position);
ALTER TABLE keel.events ADD CONSTRAINT events_pkey PRIMARY KEY USING INDEX events_pkey;
DROP INDEX keel.events_global_order_idx;
