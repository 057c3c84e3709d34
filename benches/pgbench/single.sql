-- PostgreSQL's own limit for one message per transaction, run by
-- examples/bench_stores.rs (pgbench -f single.sql -c <clients>): what the hand
-- loop and idem do per message, as plain SQL on the server: claim a new key,
-- insert the effect row, commit. Tables: pgb_keys (k text primary key),
-- pgb_effects (id text, amount bigint), created by the bench in its schema.
BEGIN;
INSERT INTO pgb_keys (k) VALUES (gen_random_uuid()::text) ON CONFLICT DO NOTHING;
INSERT INTO pgb_effects (id, amount) VALUES (gen_random_uuid()::text, 1);
COMMIT;
