-- keel-eventstore: projections with a lifecycle. See docs/projections.md.
--
-- A projection is identified by a name and a version. Each version has its
-- own checkpoint (moved in the same transaction as the read-model rows the
-- projection writes, so a restart re-applies nothing), its own parked
-- events, and records when it first caught up with the log. Readers ask
-- keel.projection_active which version to read; a version becomes active
-- only once it has caught up, so a reader never sees a half-built model.

CREATE TABLE keel.projections (
    name          text NOT NULL CHECK (name <> ''),
    version       integer NOT NULL CHECK (version > 0),
    commit        bigint NOT NULL DEFAULT 0,
    sequence      bigint NOT NULL DEFAULT 0,
    caught_up_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projections_pkey PRIMARY KEY (name, version)
);

-- The version readers use, one row per projection name. The foreign key
-- keeps a version from being retired while readers are pointed at it.
CREATE TABLE keel.projection_active (
    name        text PRIMARY KEY,
    version     integer NOT NULL,
    switched_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projection_active_version_fkey FOREIGN KEY (name, version)
        REFERENCES keel.projections (name, version)
);

-- Events a projection's handler kept failing on. `skipped` says whether the
-- checkpoint moved past the event (the skip-and-continue policy) or stays
-- before it (the halt policy, until the event is replayed or handled).
CREATE TABLE keel.parked_events (
    name        text NOT NULL,
    version     integer NOT NULL,
    commit      bigint NOT NULL,
    sequence    bigint NOT NULL,
    event_id    uuid NOT NULL,
    stream_id   text NOT NULL,
    stream_version bigint NOT NULL,
    event_type  text NOT NULL,
    attempts    integer NOT NULL CHECK (attempts > 0),
    error       text NOT NULL,
    skipped     boolean NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT parked_events_pkey PRIMARY KEY (name, version, commit, sequence),
    CONSTRAINT parked_events_projection_fkey FOREIGN KEY (name, version)
        REFERENCES keel.projections (name, version) ON DELETE CASCADE
);

-- How far a subscription has started delivering, saved before each batch is
-- handed to its handler: after a restart, events up to here may be handed
-- over a second time, and the handler is told so (Delivery::is_redelivery).
ALTER TABLE keel.subscription_checkpoints
    ADD COLUMN delivered_commit bigint,
    ADD COLUMN delivered_sequence bigint;
