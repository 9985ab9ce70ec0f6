-- Access control: roles sessiontag_app, sessiontag_user and sessiontag_reader (created when
-- missing), privileges (PUBLIC gets nothing), row-level security keyed on the setting
-- sessiontag.user_id, and SECURITY DEFINER with explicit user checks for the functions
-- that write counters, short ids or tags. See sql/60_access.sql and docs/security.md.
-- depends: 0005_search

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
-- sessiontag_user when the setting is missing. The calling role is the outer one (SET
-- ROLE's, else the session's): inside a SECURITY DEFINER function current_user is the
-- owner.
CREATE FUNCTION sessiontag._scoped_user()
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller text := current_setting('role');
    setting text;
BEGIN
    IF caller = 'none' THEN
        caller := session_user;
    END IF;
    -- pg_has_role is true for superusers, hence the second test.
    IF NOT pg_has_role(caller, 'sessiontag_user', 'USAGE')
       OR EXISTS (SELECT FROM pg_roles r WHERE r.rolname = caller AND (r.rolsuper OR r.rolbypassrls)) THEN
        RETURN NULL;
    END IF;
    setting := nullif(current_setting('sessiontag.user_id', true), '');
    IF setting IS NULL THEN
        RAISE EXCEPTION 'role % acts for one user only, and sessiontag.user_id is not set', caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Run SELECT set_config(''sessiontag.user_id'', <user uuid>, true) in the transaction first.';
    END IF;
    IF setting !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'sessiontag.user_id must be a user uuid, got %', quote_literal(setting)
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    RETURN setting::uuid;
END
$$;

-- Raises 42501 when a user-scoped caller names another user than its own (NULL is left
-- to the caller's own checks); returns _scoped_user().
CREATE FUNCTION sessiontag._check_user(user_id uuid)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._scoped_user();
BEGIN
    IF scoped IS NOT NULL AND _check_user.user_id <> scoped THEN
        RAISE EXCEPTION 'user_id % is not the user of this session (sessiontag.user_id)', _check_user.user_id
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'user_id';
    END IF;
    RETURN scoped;
END
$$;

-- The functions that write counters, short ids or tags become SECURITY DEFINER and check
-- the caller's user; the same definitions as in sql/20_models.sql, 30_sessions.sql and
-- 40_traces.sql.

CREATE OR REPLACE FUNCTION sessiontag._llm_models_short_id()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.id IS NULL THEN
            RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'not_null_violation';
        END IF;
        IF NEW.short_id IS NOT NULL THEN
            RAISE EXCEPTION 'short_id is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        NEW.short_id := sessiontag._next_free_short_id(NEW.id);
    ELSIF NEW.id IS DISTINCT FROM OLD.id OR NEW.short_id IS DISTINCT FROM OLD.short_id THEN
        RAISE EXCEPTION 'the id and short_id of a model never change (model %)', OLD.id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.generate_session_tag(user_id uuid, model_id uuid)
RETURNS sessiontag.session_tag
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    n bigint;
    scoped uuid;
BEGIN
    IF generate_session_tag.user_id IS NULL OR generate_session_tag.model_id IS NULL THEN
        RETURN NULL;
    END IF;
    scoped := sessiontag._scoped_user();
    IF generate_session_tag.user_id <> scoped THEN
        RETURN NULL;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tag.model_id AND tracked AND (scoped IS NULL OR owner_id IS NULL OR owner_id = scoped);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    n := sessiontag._take_counter(generate_session_tag.user_id, m.id);
    RETURN ROW(sessiontag._format_tag(m.short_id, n), m.name, n, m.id, m.name)::sessiontag.session_tag;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.generate_session_tags(user_id uuid, model_id uuid, n integer)
RETURNS SETOF sessiontag.session_tag
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    last bigint;
    scoped uuid := sessiontag._scoped_user();
BEGIN
    IF generate_session_tags.n IS NULL OR generate_session_tags.n < 0 OR generate_session_tags.n > 100000 THEN
        RAISE EXCEPTION 'n must be between 0 and 100000, got %', coalesce(generate_session_tags.n::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF generate_session_tags.user_id IS NULL OR generate_session_tags.model_id IS NULL
       OR generate_session_tags.n = 0 OR generate_session_tags.user_id <> scoped THEN
        RETURN;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tags.model_id AND tracked AND (scoped IS NULL OR owner_id IS NULL OR owner_id = scoped);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    last := sessiontag._take_counter(generate_session_tags.user_id, m.id, generate_session_tags.n);
    RETURN QUERY
        SELECT sessiontag._format_tag(m.short_id, k), m.name, k, m.id, m.name
        FROM generate_series(last - generate_session_tags.n + 1, last) AS k;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._conversations_tag()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    parts text[];
    issued bigint;
    scoped uuid := sessiontag._check_user(NEW.user_id);
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.session_id IS NOT NULL AND (NEW.session_id IS DISTINCT FROM OLD.session_id
                                           OR NEW.session_counter IS DISTINCT FROM OLD.session_counter) THEN
            RAISE EXCEPTION 'conversation % already has session tag %; a tag never changes', OLD.id, OLD.session_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NEW.session_id IS NOT DISTINCT FROM OLD.session_id
           AND NEW.session_counter IS NOT DISTINCT FROM OLD.session_counter THEN
            RETURN NEW;
        END IF;
    END IF;

    IF NEW.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'not_null_violation';
    END IF;
    IF NEW.llm_model_id IS NOT NULL THEN
        SELECT * INTO m FROM sessiontag.llm_models
        WHERE id = NEW.llm_model_id AND (scoped IS NULL OR owner_id IS NULL OR owner_id = scoped);
        IF NOT FOUND THEN
            RAISE EXCEPTION 'llm_model_id % is not a registered model', NEW.llm_model_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;

    IF NEW.session_id IS NULL THEN
        IF NEW.session_counter IS NOT NULL THEN
            RAISE EXCEPTION 'session_counter is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF TG_OP = 'INSERT' AND m.tracked THEN
            NEW.session_counter := sessiontag._take_counter(NEW.user_id, m.id);
            NEW.session_id := sessiontag._format_tag(m.short_id, NEW.session_counter);
            NEW.experiment_name := m.name;
        END IF;
        RETURN NEW;
    END IF;

    parts := regexp_match(NEW.session_id, '^chat_model_([0-9a-f]{6,32})_([0-9]{1,18})$');
    IF parts IS NULL THEN
        -- A manual tag: kept as given, numbered by nobody.
        IF NEW.session_counter IS NOT NULL THEN
            RAISE EXCEPTION 'session_counter is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSE
        IF m.id IS NULL THEN
            SELECT * INTO m FROM sessiontag.llm_models WHERE short_id = parts[1];
        END IF;
        SELECT c.last_value INTO issued FROM sessiontag.session_counters c
        WHERE c.user_id = NEW.user_id AND c.model_id = m.id;
        IF m.short_id IS DISTINCT FROM parts[1] OR parts[2]::bigint NOT BETWEEN 1 AND coalesce(issued, 0)
           OR coalesce(NEW.session_counter, parts[2]::bigint) <> parts[2]::bigint
           OR NEW.session_id <> sessiontag._format_tag(m.short_id, parts[2]::bigint) THEN
            RAISE EXCEPTION 'session_id % has the form of an automatic tag but was not issued for this user and model', NEW.session_id
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Take it from generate_session_tag in the same transaction, or choose a tag of another form.';
        END IF;
        NEW.llm_model_id := m.id;
        NEW.session_counter := parts[2]::bigint;
        NEW.experiment_name := coalesce(NEW.experiment_name, m.name);
    END IF;

    IF EXISTS (SELECT FROM sessiontag.conversations c
               WHERE c.user_id = NEW.user_id AND c.session_id = NEW.session_id AND c.id <> NEW.id) THEN
        RAISE EXCEPTION 'session_id % is already used by another conversation of user %', NEW.session_id, NEW.user_id
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.ensure_session_tag(conversation_id uuid, model_id uuid DEFAULT NULL, user_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._check_user(ensure_session_tag.user_id);
    c sessiontag.conversations := sessiontag._lock_conversation(ensure_session_tag.conversation_id,
                                                                coalesce(ensure_session_tag.user_id, scoped));
    tag sessiontag.session_tag;
BEGIN
    IF c.session_id IS NOT NULL THEN
        RETURN c.session_id;
    END IF;
    IF ensure_session_tag.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = ensure_session_tag.model_id
                       AND (scoped IS NULL OR m.owner_id IS NULL OR m.owner_id = scoped)) THEN
        RAISE EXCEPTION 'model_id % is not a registered model', ensure_session_tag.model_id
            USING ERRCODE = 'no_data_found';
    END IF;
    tag := sessiontag.generate_session_tag(c.user_id, coalesce(ensure_session_tag.model_id, c.llm_model_id));
    IF tag IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE sessiontag.conversations u
    SET session_id = tag.session_id, session_counter = tag.counter,
        experiment_name = tag.experiment_name, llm_model_id = tag.model_id
    WHERE u.user_id = c.user_id AND u.id = c.id;
    RETURN tag.session_id;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._refs_problem(user_id uuid, conversation_id uuid, model_id uuid, session_tag text)
RETURNS sessiontag._problem
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    conv sessiontag.conversations;
    scoped uuid := sessiontag._scoped_user();
BEGIN
    IF _refs_problem.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = _refs_problem.model_id
                       AND (scoped IS NULL OR m.owner_id IS NULL OR m.owner_id = scoped)) THEN
        RETURN ROW('model_id', format('%s is not a registered model', _refs_problem.model_id),
                   'P0002')::sessiontag._problem;
    END IF;
    IF _refs_problem.conversation_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO conv FROM sessiontag.conversations c
    WHERE c.user_id = _refs_problem.user_id AND c.id = _refs_problem.conversation_id;
    IF NOT FOUND THEN
        RETURN ROW('conversation_id', format('%s not found for user_id %s', _refs_problem.conversation_id,
                                             _refs_problem.user_id), 'P0002')::sessiontag._problem;
    END IF;
    IF _refs_problem.session_tag IS DISTINCT FROM conv.session_id AND _refs_problem.session_tag IS NOT NULL THEN
        RETURN ROW('session_tag',
                   CASE WHEN conv.session_id IS NULL
                        THEN format('%L is given, but conversation %s has no session tag', _refs_problem.session_tag,
                                    conv.id)
                        ELSE format('%L contradicts the session tag %L of conversation %s', _refs_problem.session_tag,
                                    conv.session_id, conv.id) END
                   || ' (omit session_tag: a trace carries its conversation''s tag)',
                   '22023')::sessiontag._problem;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.start_trace(
    user_id uuid,
    trace_id text,
    span_id text,
    span_name text,
    operation_type text DEFAULT 'llm_call',
    conversation_id uuid DEFAULT NULL,
    parent_span_id text DEFAULT NULL,
    model_id uuid DEFAULT NULL,
    model_name text DEFAULT NULL,
    model_provider text DEFAULT NULL,
    session_tag text DEFAULT NULL,
    input_data jsonb DEFAULT NULL,
    metadata jsonb DEFAULT NULL,
    start_time timestamptz DEFAULT now(),
    message_id text DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM sessiontag._check_user(start_trace.user_id);
    RETURN sessiontag._record_span(false, start_trace.user_id, start_trace.trace_id, start_trace.span_id,
        start_trace.span_name, start_trace.operation_type, start_trace.conversation_id, start_trace.parent_span_id,
        start_trace.model_id, start_trace.model_name, start_trace.model_provider, start_trace.session_tag,
        start_trace.input_data, start_trace.metadata, start_trace.start_time, NULL, NULL, NULL, NULL, NULL, NULL,
        NULL, start_trace.message_id);
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.end_trace(
    user_id uuid,
    trace_id text,
    span_id text,
    status text DEFAULT 'success',
    output_data jsonb DEFAULT NULL,
    input_tokens integer DEFAULT NULL,
    output_tokens integer DEFAULT NULL,
    cost_usd numeric DEFAULT NULL,
    error_message text DEFAULT NULL,
    end_time timestamptz DEFAULT now()
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result uuid;
BEGIN
    PERFORM sessiontag._check_user(end_trace.user_id);
    IF end_trace.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'null_value_not_allowed', COLUMN = 'user_id';
    END IF;
    PERFORM sessiontag._raise(coalesce(sessiontag._id_problem('trace_id', end_trace.trace_id, true),
                                       sessiontag._id_problem('span_id', end_trace.span_id, true),
                                       sessiontag._end_problem(end_trace.status, end_trace.input_tokens,
                                           end_trace.output_tokens, end_trace.cost_usd, end_trace.end_time, NULL)));
    result := sessiontag._finish_span(end_trace.user_id, end_trace.trace_id, end_trace.span_id, end_trace.status,
        end_trace.output_data, end_trace.input_tokens, end_trace.output_tokens, end_trace.cost_usd,
        end_trace.error_message, end_trace.end_time);
    IF result IS NULL THEN
        RAISE EXCEPTION 'span (trace_id %, span_id %) of user_id % not found', end_trace.trace_id, end_trace.span_id,
            end_trace.user_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'start it with start_trace first, or record a finished span with record_trace';
    END IF;
    RETURN result;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.record_trace(
    user_id uuid,
    trace_id text,
    span_id text,
    span_name text,
    operation_type text DEFAULT 'llm_call',
    conversation_id uuid DEFAULT NULL,
    parent_span_id text DEFAULT NULL,
    model_id uuid DEFAULT NULL,
    model_name text DEFAULT NULL,
    model_provider text DEFAULT NULL,
    session_tag text DEFAULT NULL,
    input_data jsonb DEFAULT NULL,
    metadata jsonb DEFAULT NULL,
    start_time timestamptz DEFAULT now(),
    status text DEFAULT 'success',
    output_data jsonb DEFAULT NULL,
    input_tokens integer DEFAULT NULL,
    output_tokens integer DEFAULT NULL,
    cost_usd numeric DEFAULT NULL,
    error_message text DEFAULT NULL,
    end_time timestamptz DEFAULT now(),
    message_id text DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM sessiontag._check_user(record_trace.user_id);
    RETURN sessiontag._record_span(true, record_trace.user_id, record_trace.trace_id, record_trace.span_id,
        record_trace.span_name, record_trace.operation_type, record_trace.conversation_id,
        record_trace.parent_span_id, record_trace.model_id, record_trace.model_name, record_trace.model_provider,
        record_trace.session_tag, record_trace.input_data, record_trace.metadata, record_trace.start_time,
        record_trace.status, record_trace.output_data, record_trace.input_tokens, record_trace.output_tokens,
        record_trace.cost_usd, record_trace.error_message, record_trace.end_time, record_trace.message_id);
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._ingest_insert(spans jsonb, with_untagged boolean)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    inserted integer;
    scoped uuid := sessiontag._scoped_user();
BEGIN
    INSERT INTO sessiontag.llm_traces AS t
        (user_id, trace_id, span_id, parent_span_id, conversation_id, message_id, session_tag, span_name,
         operation_type, model_id, model_name, model_provider, start_time, end_time, status, input_tokens,
         output_tokens, cost_usd, error_message, input_data, output_data, metadata)
    SELECT s.user_id, s.trace_id, s.span_id, s.parent_span_id, s.conversation_id, s.message_id,
           CASE WHEN s.conversation_id IS NULL THEN s.session_tag ELSE c.session_id END,
           s.span_name, coalesce(s.operation_type, 'llm_call'), s.model_id,
           coalesce(s.model_name, m.name), coalesce(s.model_provider, m.provider),
           coalesce(s.start_time, now()),
           CASE WHEN s.status = 'running' THEN NULL ELSE coalesce(s.end_time, now()) END,
           coalesce(s.status, 'success'), s.input_tokens, s.output_tokens, s.cost_usd, s.error_message,
           s.input_data, s.output_data, s.metadata
    FROM jsonb_array_elements(_ingest_insert.spans) WITH ORDINALITY AS e(elem, idx)
    CROSS JOIN LATERAL jsonb_to_record(e.elem) AS s(
        user_id uuid, trace_id text, span_id text, span_name text, operation_type text, conversation_id uuid,
        parent_span_id text, model_id uuid, model_name text, model_provider text, session_tag text,
        input_data jsonb, metadata jsonb, start_time timestamptz, status text, output_data jsonb,
        input_tokens integer, output_tokens integer, cost_usd numeric, error_message text, end_time timestamptz,
        message_id text)
    LEFT JOIN sessiontag.conversations c ON c.user_id = s.user_id AND c.id = s.conversation_id
    LEFT JOIN sessiontag.llm_models m ON m.id = s.model_id
                                      AND (scoped IS NULL OR m.owner_id IS NULL OR m.owner_id = scoped)
    -- One CASE, so every row is checked before it can be skipped (separate quals could be
    -- reordered). Mirrors _element_problem where no constraint of llm_traces does.
    WHERE CASE
        WHEN e.elem - sessiontag._span_fields() <> '{}'::jsonb
          OR s.trace_id ~ '[[:space:][:cntrl:]]' OR s.span_id ~ '[[:space:][:cntrl:]]'
          OR s.parent_span_id ~ '[[:space:][:cntrl:]]' OR s.parent_span_id = s.span_id
          OR s.model_name = '' OR s.model_provider = '' OR s.message_id = ''
          OR s.session_tag = '' OR length(s.session_tag) > 200
          OR jsonb_typeof(s.metadata) <> 'object' OR NOT isfinite(s.start_time)
          OR (s.status = 'running' AND s.end_time IS NOT NULL)
          OR (s.model_id IS NOT NULL AND m.id IS NULL)
          OR (s.conversation_id IS NOT NULL
              AND (c.id IS NULL OR (s.session_tag IS NOT NULL AND s.session_tag IS DISTINCT FROM c.session_id)))
        THEN sessiontag._invalid_span(e.idx - 1)
        WHEN s.conversation_id IS NULL THEN true
        ELSE c.analytics_enabled AND (c.session_id IS NOT NULL OR _ingest_insert.with_untagged)
    END
    ON CONFLICT ON CONSTRAINT llm_traces_user_id_trace_id_span_id_key DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.ingest_traces(spans jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._scoped_user();
    other bigint;
    n integer;
    stored integer;
    err_state text;
    err_message text;
    err_detail text;
BEGIN
    IF ingest_traces.spans IS NULL THEN
        RAISE EXCEPTION 'spans must not be NULL' USING ERRCODE = 'null_value_not_allowed', COLUMN = 'spans';
    END IF;
    IF jsonb_typeof(ingest_traces.spans) <> 'array' THEN
        RAISE EXCEPTION 'spans must be a JSON array, got %', jsonb_typeof(ingest_traces.spans)
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'spans';
    END IF;
    n := jsonb_array_length(ingest_traces.spans);
    IF n = 0 THEN
        RETURN 0;
    END IF;
    BEGIN
        IF scoped IS NOT NULL THEN
            -- (A user_id that is not a UUID fails the cast: the diagnosis below names it.)
            SELECT e.idx - 1 INTO other
            FROM jsonb_array_elements(ingest_traces.spans) WITH ORDINALITY AS e(elem, idx)
            WHERE (e.elem ->> 'user_id')::uuid <> scoped
            ORDER BY e.idx LIMIT 1;
            IF other IS NOT NULL THEN
                RAISE EXCEPTION 'spans[%].user_id: % is not the user of this session (sessiontag.user_id)', other,
                    ingest_traces.spans -> other::integer ->> 'user_id' USING ERRCODE = 'insufficient_privilege';
            END IF;
        END IF;
        stored := sessiontag._ingest_insert(ingest_traces.spans, false);
        IF stored < n THEN
            PERFORM sessiontag._ingest_tag(ingest_traces.spans);
            stored := stored + sessiontag._ingest_insert(ingest_traces.spans, true)
                             + sessiontag._ingest_complete(ingest_traces.spans);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                                err_detail = PG_EXCEPTION_DETAIL;
        -- Bad data (a cast, a constraint, a check above): name the first bad element.
        -- Anything else (a lock timeout, a deadlock, ...) goes to the caller as it is.
        IF left(err_state, 2) IN ('22', '23') OR err_state = 'P0002' THEN
            PERFORM sessiontag._ingest_diagnose(ingest_traces.spans);
            IF err_message NOT LIKE 'spans[%' THEN
                err_message := 'spans: ' || err_message;
            END IF;
        END IF;
        IF err_detail = '' THEN
            RAISE EXCEPTION USING MESSAGE = err_message, ERRCODE = err_state;
        END IF;
        RAISE EXCEPTION USING MESSAGE = err_message, ERRCODE = err_state, DETAIL = err_detail;
    END;
    RETURN stored;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._conversations_trace_tags()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE sessiontag.llm_traces t SET session_tag = NEW.session_id
    WHERE t.user_id = NEW.user_id AND t.conversation_id = NEW.id AND t.session_tag IS NULL;
    RETURN NULL;
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
GRANT INSERT (id, owner_id, name, provider, model_key), UPDATE (tracked) ON sessiontag.llm_models
    TO sessiontag_app;
-- A session_id given at insert is a manual tag, checked by the _100_tag trigger.
GRANT INSERT (id, user_id, external_id, title, llm_model_id, session_id, analytics_enabled),
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
    sessiontag._pad_counter(bigint),
    sessiontag._badge(text, text, bigint),
    sessiontag._encode_cursor(timestamptz, uuid, uuid),
    sessiontag._decode_cursor(text, text),
    sessiontag._check_page_size(integer),
    sessiontag._check_range(timestamptz, timestamptz),
    sessiontag._summarize(sessiontag.conversations)
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
    sessiontag._lock_conversation(uuid, uuid)
    TO sessiontag_app, sessiontag_user;
-- Models.
GRANT EXECUTE ON FUNCTION
    sessiontag.register_model(text, text, text, uuid, uuid),
    sessiontag.set_model_tracking(uuid, boolean)
    TO sessiontag_app;

-- Row-level security, forced so that it binds the owner too (superusers and BYPASSRLS
-- roles are never bound). "access" lets every role that holds a table privilege see
-- every row (PUBLIC holds none, so it grants nothing by itself); the restrictive
-- "own_rows" narrows sessiontag_user to the rows of sessiontag.user_id (none when unset).
ALTER TABLE sessiontag.llm_models ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.conversations ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.llm_traces ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.session_counters ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;

CREATE POLICY access ON sessiontag.llm_models TO PUBLIC USING (true) WITH CHECK (true);
CREATE POLICY access ON sessiontag.conversations TO PUBLIC USING (true) WITH CHECK (true);
CREATE POLICY access ON sessiontag.llm_traces TO PUBLIC USING (true) WITH CHECK (true);
CREATE POLICY access ON sessiontag.session_counters TO PUBLIC USING (true) WITH CHECK (true);

-- A user sees the shared models and its own, and changes none (no privilege to).
CREATE POLICY own_rows ON sessiontag.llm_models AS RESTRICTIVE TO sessiontag_user
    USING (owner_id IS NULL OR owner_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (owner_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid);
CREATE POLICY own_rows ON sessiontag.conversations AS RESTRICTIVE TO sessiontag_user
    USING (user_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid);
CREATE POLICY own_rows ON sessiontag.llm_traces AS RESTRICTIVE TO sessiontag_user
    USING (user_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid);
CREATE POLICY own_rows ON sessiontag.session_counters AS RESTRICTIVE TO sessiontag_user
    USING (user_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('sessiontag.user_id', true), '')::uuid);
