-- keel-eventstore: snapshots keep their history. See docs/operations.md
-- ("Snapshots: retention, export and import").
--
-- Until now keel.snapshots held one row per stream, each save replacing the
-- last. For long-term retention every saved snapshot is now kept, one row
-- per stream version; loads read the newest, and an operator prunes old
-- rows with a retention policy (SnapshotArchive::prune_snapshots) after
-- exporting them if they are to be kept elsewhere.
--
-- The existing rows stay as they are: each becomes its stream's newest.

ALTER TABLE keel.snapshots DROP CONSTRAINT snapshots_pkey;
ALTER TABLE keel.snapshots ADD CONSTRAINT snapshots_pkey PRIMARY KEY (stream_id, version);
