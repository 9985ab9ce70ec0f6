-- Undoes 0006_access_control: the functions as they were, no policies, no row-level
-- security, no grants to the sessiontag roles, and EXECUTE for PUBLIC again (the default).
-- The roles stay: they belong to the cluster, and other databases may use them.
-- No data is touched.

CREATE OR REPLACE FUNCTION sessiontag._llm_models_short_id()
RETURNS trigger
LANGUAGE plpgsql
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    n bigint;
BEGIN
    IF generate_session_tag.user_id IS NULL OR generate_session_tag.model_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tag.model_id AND tracked;
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    last bigint;
BEGIN
    IF generate_session_tags.n IS NULL OR generate_session_tags.n < 0 OR generate_session_tags.n > 100000 THEN
        RAISE EXCEPTION 'n must be between 0 and 100000, got %', coalesce(generate_session_tags.n::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF generate_session_tags.user_id IS NULL OR generate_session_tags.model_id IS NULL
       OR generate_session_tags.n = 0 THEN
        RETURN;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tags.model_id AND tracked;
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    parts text[];
    issued bigint;
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
        SELECT * INTO m FROM sessiontag.llm_models WHERE id = NEW.llm_model_id;
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c sessiontag.conversations := sessiontag._lock_conversation(ensure_session_tag.conversation_id, ensure_session_tag.user_id);
    tag sessiontag.session_tag;
BEGIN
    IF c.session_id IS NOT NULL THEN
        RETURN c.session_id;
    END IF;
    IF ensure_session_tag.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = ensure_session_tag.model_id) THEN
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
BEGIN
    IF _refs_problem.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = _refs_problem.model_id) THEN
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
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result uuid;
BEGIN
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
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
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
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE sessiontag.llm_traces t SET session_tag = NEW.session_id
    WHERE t.user_id = NEW.user_id AND t.conversation_id = NEW.id AND t.session_tag IS NULL;
    RETURN NULL;
END
$$;

DROP FUNCTION sessiontag._check_user(uuid);
DROP FUNCTION sessiontag._scoped_user();

DROP POLICY own_rows ON sessiontag.session_counters;
DROP POLICY own_rows ON sessiontag.llm_traces;
DROP POLICY own_rows ON sessiontag.conversations;
DROP POLICY own_rows ON sessiontag.llm_models;
DROP POLICY access ON sessiontag.session_counters;
DROP POLICY access ON sessiontag.llm_traces;
DROP POLICY access ON sessiontag.conversations;
DROP POLICY access ON sessiontag.llm_models;
ALTER TABLE sessiontag.session_counters NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.llm_traces NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.conversations NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
ALTER TABLE sessiontag.llm_models NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;

-- Revoking a table privilege revokes the column privileges of that kind as well.
REVOKE ALL ON ALL TABLES IN SCHEMA sessiontag FROM sessiontag_app, sessiontag_user, sessiontag_reader;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sessiontag FROM sessiontag_app, sessiontag_user, sessiontag_reader;
REVOKE ALL ON SCHEMA sessiontag FROM sessiontag_app, sessiontag_user, sessiontag_reader;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA sessiontag TO PUBLIC;
