-- sessiontag: access control.
--
-- Three NOLOGIN roles, granted to login roles by the DBA (see docs/security.md):
--   sessiontag_app     trusted backend: every function, for any user;
--   sessiontag_user    end-user scope: only the rows whose user_id is the setting
--                      sessiontag.user_id (row-level security, and explicit checks in the
--                      SECURITY DEFINER functions, which row-level security does not bind);
--   sessiontag_reader  read-only across users (analytics, the CLI).
-- PUBLIC executes and reads nothing. Nobody but the owner writes counters, short ids or
-- tags: those columns have no grant, and only SECURITY DEFINER functions (which take
-- the numbers and check every tag) write them.
--
-- Roles are cluster-wide: created only when missing, and kept by the rollback of this
-- step, since other databases of the cluster may use them.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['sessiontag_app', 'sessiontag_user', 'sessiontag_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migration of another database
            END;
        END IF;
    END LOOP;
END
$$;

-- The user the calling role is confined to: NULL for an unrestricted caller (the owner,
-- a superuser or BYPASSRLS role, sessiontag_app, sessiontag_reader), the setting
-- sessiontag.user_id for a member of sessiontag_user; raises 42501 for a member of
-- sessiontag_user when the setting is missing, and when user_id is given and is another
-- user (NULL is left to the caller's own checks). The calling role is the outer one (SET
-- ROLE's, else the session's): inside a SECURITY DEFINER function current_user is the
-- owner. Every write path runs it, so it is written for speed: the common unrestricted
-- caller costs one simple expression (a test with a subquery would run the executor).
CREATE FUNCTION sessiontag._check_user(user_id uuid DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller text := current_setting('role');
    setting text;
    scoped uuid;
BEGIN
    IF caller = 'none' THEN
        caller := session_user;
    END IF;
    IF NOT pg_has_role(caller, 'sessiontag_user', 'USAGE') THEN
        RETURN NULL;
    END IF;
    -- pg_has_role is true for superusers; they, and BYPASSRLS roles, are unrestricted.
    IF EXISTS (SELECT FROM pg_roles r WHERE r.rolname = caller AND (r.rolsuper OR r.rolbypassrls)) THEN
        RETURN NULL;
    END IF;
    setting := nullif(current_setting('sessiontag.user_id', true), '');
    IF setting IS NULL THEN
        RAISE EXCEPTION 'role % acts for one user only, and sessiontag.user_id is not set', caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Run SET LOCAL sessiontag.user_id = ''<user uuid>'' in the transaction first.';
    END IF;
    IF setting !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'sessiontag.user_id must be a user uuid, got %', quote_literal(setting)
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    scoped := setting::uuid;
    IF _check_user.user_id <> scoped THEN
        RAISE EXCEPTION 'user_id % is not the user of this session (sessiontag.user_id)', _check_user.user_id
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'user_id';
    END IF;
    RETURN scoped;
END
$$;

-- Privileges. Functions execute for PUBLIC by default: take that back everywhere first.
REVOKE ALL ON SCHEMA sessiontag FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA sessiontag FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sessiontag FROM PUBLIC;
GRANT USAGE ON SCHEMA sessiontag TO sessiontag_app, sessiontag_user, sessiontag_reader;

-- Tables. session_counters: nobody. short_id, session_id (after insert), session_counter,
-- experiment_name and llm_traces: written by the owner's functions only.
GRANT SELECT ON sessiontag.llm_models, sessiontag.conversations, sessiontag.llm_traces
    TO sessiontag_app, sessiontag_user, sessiontag_reader;
-- The INSERT grants include every column with a default (tracked, created_at,
-- analytics_enabled): Citus evaluates defaults on the coordinator and writes them to the
-- shard explicitly, where the caller's column privileges are checked again.
GRANT INSERT (id, owner_id, name, provider, model_key, tracked, created_at), UPDATE (tracked) ON sessiontag.llm_models
    TO sessiontag_app;
-- A session_id given at insert is a manual tag, checked by the _100_tag trigger.
GRANT INSERT (id, user_id, external_id, title, llm_model_id, session_id, analytics_enabled, created_at),
      UPDATE (external_id, title, analytics_enabled) ON sessiontag.conversations
    TO sessiontag_app, sessiontag_user;

-- Functions. Reads (SECURITY INVOKER: row-level security applies to them).
GRANT EXECUTE ON FUNCTION
    sessiontag.model_id(text, uuid),
    sessiontag.list_models(uuid),
    sessiontag.session_badge(text, uuid),
    sessiontag.list_traces(uuid, text, uuid, text, text, text, text, timestamptz, timestamptz, text, boolean, text, integer),
    sessiontag.get_trace(uuid, text),
    sessiontag.list_sessions(uuid, uuid, timestamptz, timestamptz, text, integer),
    sessiontag.session_summary(text, uuid),
    sessiontag.compare_models(uuid, uuid[], timestamptz, timestamptz),
    -- the pure helpers the reads call as their caller
    sessiontag._format_tag(text, bigint),
    sessiontag._tag_parts(text),
    sessiontag._handed_out(uuid, bigint, uuid),
    sessiontag._badge(text, text, bigint),
    sessiontag._encode_cursor(timestamptz, uuid, uuid),
    sessiontag._decode_cursor(text, text),
    sessiontag._check_page_size(integer),
    sessiontag._check_range(timestamptz, timestamptz),
    sessiontag._not_on_a_shard(text),
    sessiontag._summarize(uuid[], uuid[])
    TO sessiontag_app, sessiontag_user, sessiontag_reader;
-- Tags, conversations and traces.
GRANT EXECUTE ON FUNCTION
    sessiontag.generate_session_tag(uuid, uuid),
    sessiontag.generate_session_tags(uuid, uuid, integer),
    sessiontag.create_conversation(uuid, uuid, text, uuid, boolean, text, text),
    sessiontag.ensure_session_tag(uuid, uuid, uuid),
    sessiontag.set_analytics_tracking(uuid, boolean, uuid),
    sessiontag.start_trace(uuid, text, text, text, text, uuid, text, uuid, text, text, text, jsonb, jsonb, timestamptz, text),
    sessiontag.end_trace(uuid, text, text, text, jsonb, integer, integer, numeric, text, timestamptz),
    sessiontag.record_trace(uuid, text, text, text, text, uuid, text, uuid, text, text, text, jsonb, jsonb, timestamptz, text, jsonb, integer, integer, numeric, text, timestamptz, text),
    sessiontag.ingest_traces(jsonb),
    sessiontag.create_span_staging(),
    sessiontag.ingest_staged_spans(),
    sessiontag._lock_conversation(uuid, uuid)
    TO sessiontag_app, sessiontag_user;
-- OpenTelemetry ingestion: runs as its caller, so the conversations it creates pass
-- row-level security; the spans go through ingest_traces.
GRANT EXECUTE ON FUNCTION
    sessiontag.ingest_otlp(jsonb, uuid),
    sessiontag._otlp_attributes(jsonb),
    sessiontag._otlp_time(jsonb)
    TO sessiontag_app, sessiontag_user;
-- The backfill (see docs/sql-api.md): numbering conversations of any user is the
-- trusted backend's, or the DBA's.
GRANT EXECUTE ON FUNCTION
    sessiontag.count_untagged_conversations(uuid, uuid)
    TO sessiontag_app, sessiontag_reader;
GRANT EXECUTE ON FUNCTION
    sessiontag.tag_untagged_conversations(uuid, uuid, integer)
    TO sessiontag_app;
-- Models.
GRANT EXECUTE ON FUNCTION
    sessiontag.register_model(text, text, text, uuid, uuid),
    sessiontag.set_model_tracking(uuid, boolean)
    TO sessiontag_app;

-- The OTLP receiver's span-by-span ingestion and its helpers. ingest_otlp_partial runs as
-- its caller, like ingest_otlp; the helpers that read or write stored spans
-- (_otlp_ingest, _otlp_problems, _otlp_link_traces) run as the owner and keep a
-- user-scoped caller to its own user. Each asks _check_user which user its caller is
-- confined to.
GRANT EXECUTE ON FUNCTION
    sessiontag.ingest_otlp_partial(jsonb, uuid),
    sessiontag._otlp_ingest(jsonb, uuid, boolean),
    sessiontag._otlp_value(jsonb),
    sessiontag._otlp_json(jsonb),
    sessiontag._otlp_problems(jsonb),
    sessiontag._otlp_link_traces(jsonb),
    sessiontag._check_user(uuid)
    TO sessiontag_app, sessiontag_user;

-- Row-level security, forced so that it binds the owner too (superusers and BYPASSRLS
-- roles are never bound). One permissive policy per table, "access": a role that is not
-- a member of sessiontag_user sees and writes every row its table privileges allow
-- (PUBLIC holds none, so it gets nothing); a member of sessiontag_user only the rows of
-- the user named by sessiontag.user_id, none when it is unset. Only permissive policies,
-- built-in functions and no subquery: Citus copies a policy to every shard without AS
-- RESTRICTIVE and refuses subqueries in policies, and the expression runs on the workers
-- as it is written, with the setting as the caller's SET LOCAL brings it there. (The
-- membership test costs about 0.2 microseconds per row read.)
ALTER TABLE sessiontag.llm_models ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.conversations ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.llm_traces ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.session_counters ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;

-- A user sees the shared models and its own, and changes none (no privilege to).
CREATE POLICY access ON sessiontag.llm_models TO PUBLIC
    USING (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER') OR owner_id IS NULL
           OR owner_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
                OR owner_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);
CREATE POLICY access ON sessiontag.conversations TO PUBLIC
    USING (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
           OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
                OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);
CREATE POLICY access ON sessiontag.llm_traces TO PUBLIC
    USING (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
           OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
                OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);
CREATE POLICY access ON sessiontag.session_counters TO PUBLIC
    USING (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
           OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
                OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);
