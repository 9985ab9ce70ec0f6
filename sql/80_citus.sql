-- sessiontag: distribution on Citus.
--
-- On a database with the citus extension, sessiontag.distribute() makes llm_models (and
-- any other table without user_id) a reference table and every per-user table a table
-- distributed by user_id, all colocated, so that one user's conversations, counters and
-- spans live on one node and every per-user statement runs there. On plain PostgreSQL
-- it refuses with one line; nothing else in sessiontag depends on Citus.
--
-- Every call to Citus is dynamic SQL from a variable: its functions and catalogs exist
-- only where the extension does, and the functions must compile (and pass plpgsql_check)
-- without it.

-- Distributes the schema; returns each table with its distribution and whether this call
-- changed it. Idempotent: a second call changes nothing. Runs in the caller's
-- transaction, so it is all or nothing.
CREATE FUNCTION sessiontag.distribute(shard_count integer DEFAULT NULL)
RETURNS TABLE (table_name text, distribution text, changed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    fk record;
    trig record;
    fks text[] := '{}'::text[];
    citus_call text;
    first_distributed regclass;
    kind text;
    done boolean;
BEGIN
    IF distribute.shard_count IS NOT NULL AND distribute.shard_count NOT BETWEEN 1 AND 64000 THEN
        RAISE EXCEPTION 'shard_count must be between 1 and 64000, got %', distribute.shard_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_extension e WHERE e.extname = 'citus') THEN
        RAISE EXCEPTION 'distribute needs the citus extension, and database % does not have it', current_database()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Run CREATE EXTENSION citus and add the worker nodes (citus_add_node) first.';
    END IF;
    -- The triggers (tagging, short ids, numbers kept) run on the shards, where each
    -- statement of one user finds that user's rows on the same node. SET LOCAL of
    -- sessiontag.user_id must reach the workers, where row-level security reads it.
    -- Settings of the database, for every later session, and of this transaction.
    EXECUTE format('ALTER DATABASE %I SET citus.enable_unsafe_triggers = on', current_database());
    EXECUTE format('ALTER DATABASE %I SET citus.propagate_set_commands = local', current_database());
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM set_config('citus.propagate_set_commands', 'local', true);
    -- One connection per node: the copies and DDL below run in one transaction.
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    IF distribute.shard_count IS NOT NULL THEN
        PERFORM set_config('citus.shard_count', distribute.shard_count::text, true);
    END IF;

    -- Foreign keys between sessiontag tables are taken off while the tables change kind
    -- (Citus turns a local table that refers to a reference table into a "Citus local
    -- table", which cannot then be distributed) and put back as they were afterwards.
    -- Never CASCADE: nothing else may go with them.
    FOR fk IN
        SELECT c.conname, c.conrelid::regclass AS rel, pg_get_constraintdef(c.oid) AS def
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.connamespace = 'sessiontag'::regnamespace
          AND c.confrelid IN (SELECT r.oid FROM pg_class r WHERE r.relnamespace = 'sessiontag'::regnamespace)
          AND sessiontag._distribution(c.conrelid) IS NULL
        ORDER BY c.conrelid, c.conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
        fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
    END LOOP;

    -- Reference tables first (the distributed ones refer to them), then the per-user
    -- tables, colocated with the first of them (conversations).
    FOR t IN
        SELECT r.oid::regclass AS rel, r.relname::text AS name,
               EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = r.oid AND a.attname = 'user_id'
                       AND NOT a.attisdropped) AS per_user
        FROM pg_class r
        WHERE r.relnamespace = 'sessiontag'::regnamespace AND r.relkind IN ('r', 'p')
        ORDER BY 3, r.relname <> 'conversations', r.relname
    LOOP
        kind := sessiontag._distribution(t.rel);
        done := kind IS NULL;
        IF done THEN
            -- The rows already there are copied to the shards as they are: the triggers,
            -- which refuse to be given what sessiontag assigns, must not see that copy.
            -- The table's lock, taken here, keeps every other writer out until commit.
            FOR trig IN
                SELECT g.tgname FROM pg_trigger g WHERE g.tgrelid = t.rel AND NOT g.tgisinternal AND g.tgenabled <> 'D'
            LOOP
                EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', t.rel, trig.tgname);
            END LOOP;
            IF t.per_user THEN
                citus_call := 'SELECT create_distributed_table($1, ''user_id'', colocate_with => $2)';
                EXECUTE citus_call USING t.rel, coalesce(first_distributed::text, 'none');
            ELSE
                citus_call := 'SELECT create_reference_table($1)';
                EXECUTE citus_call USING t.rel;
            END IF;
            -- The coordinator's own copy of the rows is no longer read: free it.
            citus_call := 'SELECT truncate_local_data_after_distributing_table($1)';
            EXECUTE citus_call USING t.rel;
            FOR trig IN
                SELECT g.tgname FROM pg_trigger g WHERE g.tgrelid = t.rel AND NOT g.tgisinternal AND g.tgenabled = 'D'
            LOOP
                EXECUTE format('ALTER TABLE %s ENABLE TRIGGER %I', t.rel, trig.tgname);
            END LOOP;
            kind := sessiontag._distribution(t.rel);
        END IF;
        IF t.per_user AND first_distributed IS NULL THEN
            first_distributed := t.rel;
        END IF;
        table_name := t.name;
        distribution := kind;
        changed := done;
        RETURN NEXT;
    END LOOP;

    FOREACH citus_call IN ARRAY fks LOOP
        EXECUTE citus_call;
    END LOOP;

    -- Every function exists on every node: the triggers run there, and so do the
    -- functions they call. Later CREATE OR REPLACE FUNCTION statements propagate by
    -- themselves once a function is distributed.
    FOR t IN
        SELECT p.oid::regprocedure::text AS signature FROM pg_proc p
        WHERE p.pronamespace = 'sessiontag'::regnamespace
        ORDER BY p.oid
    LOOP
        citus_call := 'SELECT create_distributed_function($1::regprocedure)';
        EXECUTE citus_call USING t.signature;
    END LOOP;
END
$$;

-- How Citus holds a table: 'reference', 'distributed by <column>', 'citus local', or NULL
-- for a plain table (and wherever Citus is absent).
CREATE FUNCTION sessiontag._distribution(rel regclass)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    method "char";
    model "char";
    column_name text;
    -- In a variable: the catalog exists only with Citus (and static checkers look at
    -- constant EXECUTE strings).
    query text := 'SELECT partmethod, repmodel, column_to_column_name(logicalrelid, partkey)'
                  ' FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1';
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE query INTO method, model, column_name USING _distribution.rel;
    RETURN CASE WHEN method IS NULL THEN NULL
                WHEN method = 'h' THEN 'distributed by ' || column_name
                WHEN model = 't' THEN 'reference'
                ELSE 'citus local' END;
END
$$;

-- Distributing is the owner's (or a superuser's) alone.
REVOKE ALL ON FUNCTION sessiontag.distribute(integer), sessiontag._distribution(regclass) FROM PUBLIC;
