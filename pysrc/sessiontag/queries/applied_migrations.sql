-- The migrations yoyo recorded as applied (its bookkeeping lives in schema public; see
-- migrate.yoyo_uri). Read directly: listing needs no lock and creates nothing.
SELECT migration_hash, migration_id, applied_at_utc
FROM public._yoyo_migration
