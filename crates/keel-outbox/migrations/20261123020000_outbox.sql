-- Transactional outbox: integration events written in the same transaction
-- as the business change, then published to the bus by keel-outbox's relay.
CREATE TABLE keel.outbox (
    -- Insertion order. Within one aggregate it is also commit order, because
    -- writers hold a per-aggregate advisory lock from insert to commit.
    id              bigint GENERATED ALWAYS AS IDENTITY,
    event_id        uuid        NOT NULL,
    topic           text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    ordering_key    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Set once the bus accepted the message; the row is pruned later.
    published_at    timestamptz,
    -- Failed publish attempts so far, and when the next one may start.
    attempts        integer     NOT NULL DEFAULT 0,
    retry_at        timestamptz,
    last_error      text,
    CONSTRAINT outbox_pkey PRIMARY KEY (id),
    CONSTRAINT outbox_event_id_key UNIQUE (event_id),
    CONSTRAINT outbox_topic_check CHECK (topic <> ''),
    CONSTRAINT outbox_aggregate_check CHECK (aggregate_type <> '' AND aggregate_id <> ''),
    CONSTRAINT outbox_event_type_check CHECK (event_type <> ''),
    CONSTRAINT outbox_schema_version_check CHECK (schema_version >= 0)
);

-- The relay's scan: unpublished rows in id order.
CREATE INDEX outbox_pending_idx ON keel.outbox (id) WHERE published_at IS NULL;
-- Finding an aggregate's oldest unpublished row (its head).
CREATE INDEX outbox_pending_aggregate_idx
    ON keel.outbox (aggregate_type, aggregate_id, id) WHERE published_at IS NULL;
-- Aggregates whose head is waiting to retry a failed publish.
CREATE INDEX outbox_retry_idx
    ON keel.outbox (aggregate_type, aggregate_id)
    WHERE published_at IS NULL AND retry_at IS NOT NULL;
-- Pruning published rows past their retention.
CREATE INDEX outbox_published_at_idx
    ON keel.outbox (published_at) WHERE published_at IS NOT NULL;

-- Inbox for idempotent consumers: one row per (consumer, event) handled,
-- committed in the same transaction as the handler's effects.
CREATE TABLE keel.inbox (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_pkey PRIMARY KEY (consumer, event_id),
    CONSTRAINT inbox_consumer_check CHECK (consumer <> '')
);

-- Pruning old inbox rows past the deduplication window.
CREATE INDEX inbox_handled_at_idx ON keel.inbox (handled_at);
