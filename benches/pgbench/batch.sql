-- PostgreSQL's own limit for batches, run by examples/bench_stores.rs
-- (pgbench -f batch.sql -D batch=<n> -c <clients>): per transaction, claim
-- :batch new keys in one statement, insert :batch effect rows in one
-- statement, commit. Throughput in messages/s = tps × :batch.
BEGIN;
INSERT INTO pgb_keys (k) SELECT gen_random_uuid()::text FROM generate_series(1, :batch) ON CONFLICT DO NOTHING;
INSERT INTO pgb_effects (id, amount) SELECT gen_random_uuid()::text, g FROM generate_series(1, :batch) AS g;
COMMIT;
