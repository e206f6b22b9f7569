-- Keel keeps its own tables in a schema of their own, so they never collide
-- with a service's tables.
CREATE SCHEMA IF NOT EXISTS keel;
