-- Stricter input. ingest_traces takes text fields only as JSON strings and times only
-- as ISO 8601 (not 'now', 'yesterday', ...); no NaN cost (nor in end_trace and
-- record_trace), and a huge cost is shown in scientific notation; ingest_otlp names the
-- span of a malformed time; register_model refuses an empty provider;
-- create_conversation names model_id (not llm_model_id) for another user's private
-- model. ingest_otlp inserts a new conversation untagged and tags it under its row
-- lock, so concurrent exports of one new conversation lose no session number.
-- The bodies below replace the earlier ones.
-- depends: 0008_tag_rules

-- How a time in ingest_traces begins: an ISO 8601 date (2026-11-24, 2026-11-24T09:30:00Z,
-- 2026-11-24 09:30:00.123456+01:00; without an offset, in the session's TimeZone). So no
-- PostgreSQL word ('now', 'yesterday', 'epoch', ...) and no form whose meaning depends on
-- DateStyle ('1/2/2026'). Only the start is matched: the cast checks the rest, and a full
-- pattern would cost ingest_traces several percent.
CREATE OR REPLACE FUNCTION sessiontag._iso_time_pattern()
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '^[0-9]{4}-[0-9]{2}-[0-9]{2}'
$$;

-- The span fields that hold text: in ingest_traces, a JSON string (or null) only; a
-- number, boolean, array or object there is a caller's bug, not text to keep.
CREATE OR REPLACE FUNCTION sessiontag._span_text_fields()
RETURNS text[]
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['trace_id', 'span_id', 'span_name', 'operation_type', 'parent_span_id', 'model_name',
                 'model_provider', 'session_tag', 'status', 'error_message', 'message_id']
$$;

-- Registers a model; registering again with the same (owner_id, model_key) returns the
-- existing id. model_key defaults to name.
CREATE OR REPLACE FUNCTION sessiontag.register_model(
    name text,
    provider text DEFAULT NULL,
    model_key text DEFAULT NULL,
    owner_id uuid DEFAULT NULL,
    id uuid DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key text := coalesce(register_model.model_key, register_model.name);
    result uuid;
BEGIN
    IF register_model.name IS NULL THEN
        RAISE EXCEPTION 'name must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF btrim(register_model.name) = '' THEN
        RAISE EXCEPTION 'name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(register_model.name) > 200 THEN
        RAISE EXCEPTION 'name is longer than 200 characters' USING ERRCODE = 'string_data_right_truncation';
    END IF;
    IF btrim(key) = '' OR length(key) > 200 THEN
        RAISE EXCEPTION 'model_key must be 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF register_model.provider = '' THEN
        RAISE EXCEPTION 'provider must not be empty (NULL when unknown)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(register_model.provider) > 200 THEN
        RAISE EXCEPTION 'provider is longer than 200 characters' USING ERRCODE = 'string_data_right_truncation';
    END IF;

    INSERT INTO sessiontag.llm_models AS m (id, owner_id, name, provider, model_key)
    VALUES (coalesce(register_model.id, gen_random_uuid()), register_model.owner_id,
            register_model.name, register_model.provider, key)
    ON CONFLICT ON CONSTRAINT llm_models_owner_id_model_key_key DO NOTHING
    RETURNING m.id INTO result;

    IF result IS NULL THEN
        SELECT m.id INTO result
        FROM sessiontag.llm_models m
        WHERE m.model_key = key AND m.owner_id IS NOT DISTINCT FROM register_model.owner_id;
    END IF;
    RETURN result;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'id % is already registered for another model', register_model.id
        USING ERRCODE = 'unique_violation';
END
$$;

-- Creates a conversation, tagged at creation when model_id names a tracked model.
CREATE OR REPLACE FUNCTION sessiontag.create_conversation(
    user_id uuid,
    model_id uuid DEFAULT NULL,
    title text DEFAULT NULL,
    id uuid DEFAULT NULL,
    analytics_enabled boolean DEFAULT true,
    external_id text DEFAULT NULL,
    session_id text DEFAULT NULL
)
RETURNS sessiontag.conversations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result sessiontag.conversations;
BEGIN
    IF create_conversation.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF create_conversation.analytics_enabled IS NULL THEN
        RAISE EXCEPTION 'analytics_enabled must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF length(create_conversation.title) > 1000 THEN
        RAISE EXCEPTION 'title is longer than 1000 characters' USING ERRCODE = 'string_data_right_truncation';
    END IF;
    IF create_conversation.external_id = '' OR length(create_conversation.external_id) > 200 THEN
        RAISE EXCEPTION 'external_id must be 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_conversation.session_id = '' OR length(create_conversation.session_id) > 200 THEN
        RAISE EXCEPTION 'session_id must be 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Friendly errors for the common mistakes; the constraints remain the guard.
    IF create_conversation.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m
                       WHERE m.id = create_conversation.model_id
                         AND (m.owner_id IS NULL OR m.owner_id = create_conversation.user_id)) THEN
        RAISE EXCEPTION 'model_id % is not a registered model', create_conversation.model_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF create_conversation.id IS NOT NULL AND EXISTS (
           SELECT FROM sessiontag.conversations c
           WHERE c.user_id = create_conversation.user_id AND c.id = create_conversation.id) THEN
        RAISE EXCEPTION 'conversation id % already exists for user %', create_conversation.id, create_conversation.user_id
            USING ERRCODE = 'unique_violation';
    END IF;
    IF create_conversation.external_id IS NOT NULL AND EXISTS (
           SELECT FROM sessiontag.conversations c
           WHERE c.user_id = create_conversation.user_id AND c.external_id = create_conversation.external_id) THEN
        RAISE EXCEPTION 'external_id % is already used by another conversation of user %',
            create_conversation.external_id, create_conversation.user_id USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO sessiontag.conversations AS c
        (id, user_id, external_id, title, llm_model_id, session_id, analytics_enabled)
    VALUES (coalesce(create_conversation.id, gen_random_uuid()), create_conversation.user_id,
            create_conversation.external_id, create_conversation.title, create_conversation.model_id,
            create_conversation.session_id, create_conversation.analytics_enabled)
    RETURNING c.* INTO result;
    RETURN result;
END
$$;

-- The first problem of a span's end. running_allowed: ingest_traces also takes started
-- spans (status running, no end_time); end_trace and record_trace take finished ones.
CREATE OR REPLACE FUNCTION sessiontag._end_problem(
    status text,
    input_tokens integer,
    output_tokens integer,
    cost_usd numeric,
    end_time timestamptz,
    start_time timestamptz,
    running_allowed boolean DEFAULT false
)
RETURNS sessiontag._problem
LANGUAGE plpgsql
STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cost text;
BEGIN
    IF _end_problem.status IS NULL THEN
        RETURN ROW('status', 'must not be NULL', '22004')::sessiontag._problem;
    END IF;
    IF _end_problem.status = 'running' AND _end_problem.running_allowed THEN
        IF _end_problem.end_time IS NOT NULL THEN
            RETURN ROW('end_time', 'must be absent while status is running', '22023')::sessiontag._problem;
        END IF;
    ELSIF _end_problem.status NOT IN ('success', 'error', 'cancelled') THEN
        RETURN ROW('status', format('must be %s, got %L',
                                    CASE WHEN _end_problem.running_allowed THEN 'running, success, error or cancelled'
                                         ELSE 'success, error or cancelled' END,
                                    _end_problem.status), '22023')::sessiontag._problem;
    END IF;
    IF _end_problem.input_tokens < 0 THEN
        RETURN ROW('input_tokens', format('must not be negative, got %s', _end_problem.input_tokens),
                   '22023')::sessiontag._problem;
    END IF;
    IF _end_problem.output_tokens < 0 THEN
        RETURN ROW('output_tokens', format('must not be negative, got %s', _end_problem.output_tokens),
                   '22023')::sessiontag._problem;
    END IF;
    IF _end_problem.cost_usd = 'NaN' THEN
        RETURN ROW('cost_usd', 'must be a number, got NaN', '22023')::sessiontag._problem;
    END IF;
    -- A number of hundreds of digits is shown in scientific notation.
    cost := CASE WHEN length(_end_problem.cost_usd::text) > 30
                 THEN btrim(to_char(_end_problem.cost_usd, '9.999999EEEE')) ELSE _end_problem.cost_usd::text END;
    IF _end_problem.cost_usd < 0 THEN
        RETURN ROW('cost_usd', format('must not be negative, got %s', cost), '22023')::sessiontag._problem;
    END IF;
    -- llm_traces.cost_usd is numeric(18, 8): 8 decimals, under 10^10 once rounded to them.
    IF round(_end_problem.cost_usd, 8) >= 1e10 THEN
        RETURN ROW('cost_usd', format('must be less than 10000000000, got %s', cost), '22003')::sessiontag._problem;
    END IF;
    IF _end_problem.status <> 'running' THEN
        IF _end_problem.end_time IS NULL THEN
            RETURN ROW('end_time', 'must not be NULL', '22004')::sessiontag._problem;
        END IF;
        IF NOT isfinite(_end_problem.end_time) THEN
            RETURN ROW('end_time', 'must be a finite time', '22008')::sessiontag._problem;
        END IF;
        IF _end_problem.end_time < _end_problem.start_time THEN
            RETURN ROW('end_time', format('%s is before start_time %s', _end_problem.end_time,
                                          _end_problem.start_time), '22023')::sessiontag._problem;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- Inserts the batch's new spans in one INSERT ... SELECT (the fast path of
-- ingest_traces) and returns how many it inserted. Checks the table's constraints do not
-- make are inline (a failing row calls _invalid_span). Spans of conversations with
-- analytics off are skipped; spans of untagged conversations wait for the second call
-- (with_untagged), after _ingest_tag. Existing spans are left to _ingest_complete.
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
                                      AND (m.owner_id IS NULL OR m.owner_id = s.user_id)
    -- One CASE, so every row is checked before it can be skipped (separate quals could be
    -- reordered). Mirrors _element_problem where no constraint of llm_traces does.
    WHERE CASE
        WHEN e.elem - sessiontag._span_fields() <> '{}'::jsonb
          -- _span_text_fields(), written out: a subquery over it per row would cost more.
          OR jsonb_typeof(e.elem -> 'trace_id') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'span_id') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'parent_span_id') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'span_name') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'operation_type') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'model_name') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'model_provider') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'session_tag') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'status') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'error_message') NOT IN ('string', 'null')
          OR jsonb_typeof(e.elem -> 'message_id') NOT IN ('string', 'null')
          OR e.elem ->> 'start_time' !~ sessiontag._iso_time_pattern()
          OR e.elem ->> 'end_time' !~ sessiontag._iso_time_pattern()
          OR s.cost_usd = 'NaN'
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

-- The first problem of one ingest_traces element, as record_trace (or, with status
-- running, start_trace) would report it: shape, unknown keys, each field's type, then
-- the values and references. Only run after the fast path failed, to name the culprit.
CREATE OR REPLACE FUNCTION sessiontag._element_problem(elem jsonb)
RETURNS sessiontag._problem
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    unknown text;
    field text;
    s record;
    p sessiontag._problem;
    stored_start timestamptz;
BEGIN
    IF jsonb_typeof(_element_problem.elem) <> 'object' THEN
        RETURN ROW('', format('must be a JSON object, got %s', jsonb_typeof(_element_problem.elem)),
                   '22023')::sessiontag._problem;
    END IF;
    SELECT k INTO unknown FROM jsonb_object_keys(_element_problem.elem) AS k
    WHERE k <> ALL (sessiontag._span_fields()) ORDER BY k LIMIT 1;
    IF unknown IS NOT NULL THEN
        RETURN ROW(unknown, CASE WHEN unknown = 'duration_ms'
                                 THEN 'is derived from start_time and end_time and cannot be given'
                                 ELSE 'is not a span field (the fields are record_trace''s parameters)' END,
                   '22023')::sessiontag._problem;
    END IF;
    SELECT k INTO field FROM unnest(sessiontag._span_text_fields()) WITH ORDINALITY AS f(k, n)
    WHERE jsonb_typeof(_element_problem.elem -> f.k) NOT IN ('string', 'null') ORDER BY f.n LIMIT 1;
    IF field IS NOT NULL THEN
        RETURN ROW(field, format('must be a JSON string, got %s %s', jsonb_typeof(_element_problem.elem -> field),
                                 _element_problem.elem -> field), '22023')::sessiontag._problem;
    END IF;
    -- Only an ISO 8601 time: PostgreSQL's words ('now', 'yesterday', 'epoch', ...) and
    -- other forms it reads are no span's time.
    FOREACH field IN ARRAY ARRAY['start_time', 'end_time'] LOOP
        IF _element_problem.elem ->> field !~ sessiontag._iso_time_pattern() THEN
            RETURN ROW(field, format('must be an ISO 8601 time, got %s', _element_problem.elem -> field),
                       '22007')::sessiontag._problem;
        END IF;
    END LOOP;
    BEGIN
        SELECT * INTO s FROM jsonb_to_record(_element_problem.elem) AS x(
            user_id uuid, trace_id text, span_id text, span_name text, operation_type text, conversation_id uuid,
            parent_span_id text, model_id uuid, model_name text, model_provider text, session_tag text,
            input_data jsonb, metadata jsonb, start_time timestamptz, status text, output_data jsonb,
            input_tokens integer, output_tokens integer, cost_usd numeric, error_message text, end_time timestamptz,
            message_id text);
    EXCEPTION WHEN OTHERS THEN
        -- A value does not convert: convert each typed field on its own to name it.
        FOREACH field IN ARRAY ARRAY['user_id', 'conversation_id', 'model_id'] LOOP
            BEGIN
                PERFORM (_element_problem.elem ->> field)::uuid;
            EXCEPTION WHEN OTHERS THEN
                RETURN ROW(field, SQLERRM, SQLSTATE)::sessiontag._problem;
            END;
        END LOOP;
        FOREACH field IN ARRAY ARRAY['start_time', 'end_time'] LOOP
            BEGIN
                PERFORM (_element_problem.elem ->> field)::timestamptz;
            EXCEPTION WHEN OTHERS THEN
                RETURN ROW(field, SQLERRM, SQLSTATE)::sessiontag._problem;
            END;
        END LOOP;
        FOREACH field IN ARRAY ARRAY['input_tokens', 'output_tokens'] LOOP
            BEGIN
                PERFORM (_element_problem.elem ->> field)::integer;
            EXCEPTION WHEN OTHERS THEN
                RETURN ROW(field, SQLERRM, SQLSTATE)::sessiontag._problem;
            END;
        END LOOP;
        BEGIN
            PERFORM (_element_problem.elem ->> 'cost_usd')::numeric;
        EXCEPTION WHEN OTHERS THEN
            RETURN ROW('cost_usd', SQLERRM, SQLSTATE)::sessiontag._problem;
        END;
        RAISE;
    END;
    -- JSON null, like an absent key, means the parameter's default.
    s.operation_type := coalesce(s.operation_type, 'llm_call');
    s.start_time := coalesce(s.start_time, now());
    s.status := coalesce(s.status, 'success');
    IF s.status <> 'running' THEN
        s.end_time := coalesce(s.end_time, now());
    END IF;
    p := coalesce(sessiontag._start_problem(s.user_id, s.trace_id, s.span_id, s.span_name, s.operation_type,
                      s.parent_span_id, s.model_name, s.model_provider, s.session_tag, s.metadata, s.start_time,
                      s.message_id),
                  sessiontag._end_problem(s.status, s.input_tokens, s.output_tokens, s.cost_usd, s.end_time,
                      s.start_time, true),
                  sessiontag._refs_problem(s.user_id, s.conversation_id, s.model_id, s.session_tag));
    IF p.field IS NOT NULL OR s.status = 'running' THEN
        RETURN p;
    END IF;
    -- Ending a span stored running by an earlier call: the end follows the stored start.
    SELECT t.start_time INTO stored_start FROM sessiontag.llm_traces t
    WHERE t.user_id = s.user_id AND t.trace_id = s.trace_id AND t.span_id = s.span_id AND t.status = 'running';
    RETURN sessiontag._end_problem(s.status, s.input_tokens, s.output_tokens, s.cost_usd, s.end_time, stored_start);
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.ingest_otlp(payload jsonb, default_user_id uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    flat jsonb;
    spans jsonb;
    paths text[];
    bad record;
    err_state text;
    err_message text;
    idx integer;
    fresh_conversation record;
BEGIN
    IF ingest_otlp.payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed', COLUMN = 'payload';
    END IF;
    IF jsonb_typeof(ingest_otlp.payload) <> 'object'
       OR jsonb_typeof(ingest_otlp.payload -> 'resourceSpans') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'payload must be an OTLP/JSON ExportTraceServiceRequest: an object with a resourceSpans array'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'payload';
    END IF;
    -- The shape first, so a malformed request is named by its path, not by a cast deep inside.
    SELECT x.path, x.problem INTO bad FROM (
        SELECT format('payload.resourceSpans[%s].scopeSpans', r.i - 1) AS path, 'must be an array' AS problem, r.i, 0 AS s
        FROM jsonb_array_elements(ingest_otlp.payload -> 'resourceSpans') WITH ORDINALITY AS r(rs, i)
        WHERE jsonb_typeof(r.rs) <> 'object' OR jsonb_typeof(coalesce(r.rs -> 'scopeSpans', '[]')) <> 'array'
        UNION ALL
        SELECT format('payload.resourceSpans[%s].scopeSpans[%s].spans', r.i - 1, s.i - 1), 'must be an array', r.i, s.i
        FROM jsonb_array_elements(ingest_otlp.payload -> 'resourceSpans') WITH ORDINALITY AS r(rs, i)
        CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(r.rs -> 'scopeSpans') = 'array'
                                                     THEN r.rs -> 'scopeSpans' ELSE '[]' END) WITH ORDINALITY AS s(ss, i)
        WHERE jsonb_typeof(s.ss) <> 'object' OR jsonb_typeof(coalesce(s.ss -> 'spans', '[]')) <> 'array'
    ) x ORDER BY x.i, x.s LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%: %', bad.path, bad.problem USING ERRCODE = 'invalid_parameter_value', COLUMN = 'payload';
    END IF;

    -- Every span with its path and its attributes (the resource's, overridden by the span's).
    SELECT jsonb_agg(jsonb_build_object(
               'path', format('payload.resourceSpans[%s].scopeSpans[%s].spans[%s]', r.i - 1, s.i - 1, p.i - 1),
               'span', p.span,
               'attrs', sessiontag._otlp_attributes(r.rs -> 'resource' -> 'attributes')
                        || sessiontag._otlp_attributes(p.span -> 'attributes'))
           ORDER BY r.i, s.i, p.i)
    INTO flat
    FROM jsonb_array_elements(ingest_otlp.payload -> 'resourceSpans') WITH ORDINALITY AS r(rs, i)
    CROSS JOIN LATERAL jsonb_array_elements(coalesce(r.rs -> 'scopeSpans', '[]')) WITH ORDINALITY AS s(ss, i)
    CROSS JOIN LATERAL jsonb_array_elements(coalesce(s.ss -> 'spans', '[]')) WITH ORDINALITY AS p(span, i);
    IF flat IS NULL THEN
        RETURN 0;
    END IF;

    SELECT e.f ->> 'path' AS path INTO bad FROM jsonb_array_elements(flat) WITH ORDINALITY AS e(f, n)
    WHERE jsonb_typeof(e.f -> 'span') <> 'object' ORDER BY e.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%: must be a span object', bad.path USING ERRCODE = 'invalid_parameter_value', COLUMN = 'payload';
    END IF;
    SELECT format('%s.%s', e.f ->> 'path', t.k) AS path, e.f -> 'span' -> t.k AS value INTO bad
    FROM jsonb_array_elements(flat) WITH ORDINALITY AS e(f, n)
    CROSS JOIN unnest(ARRAY['startTimeUnixNano', 'endTimeUnixNano']) WITH ORDINALITY AS t(k, i)
    WHERE e.f -> 'span' ->> t.k !~ '^[0-9]{0,19}$'
    ORDER BY e.n, t.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%: must be nanoseconds since the epoch, got %', bad.path, bad.value
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'payload';
    END IF;
    SELECT e.f ->> 'path' AS path, e.f -> 'attrs' ->> 'user.id' AS value INTO bad
    FROM jsonb_array_elements(flat) WITH ORDINALITY AS e(f, n)
    WHERE e.f -> 'attrs' ->> 'user.id' !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$'
       OR (e.f -> 'attrs' ->> 'user.id' IS NULL AND ingest_otlp.default_user_id IS NULL)
    ORDER BY e.n LIMIT 1;
    IF FOUND THEN
        IF bad.value IS NULL THEN
            RAISE EXCEPTION '%: no user: give the attribute user.id, or default_user_id', bad.path
                USING ERRCODE = 'null_value_not_allowed', COLUMN = 'default_user_id';
        END IF;
        RAISE EXCEPTION '%.attributes[user.id]: % is not a uuid', bad.path, quote_literal(bad.value)
            USING ERRCODE = 'invalid_text_representation', COLUMN = 'payload';
    END IF;

    -- Who, which conversation (by the application's id), which registered model.
    SELECT jsonb_agg(x.f || jsonb_build_object(
               'user_id', x.user_id,
               'external_id', coalesce(x.f -> 'attrs' ->> 'gen_ai.conversation.id', x.f -> 'attrs' ->> 'session.id'),
               'model_id', coalesce(sessiontag.model_id(x.f -> 'attrs' ->> 'gen_ai.request.model', x.user_id),
                                    sessiontag.model_id(x.f -> 'attrs' ->> 'gen_ai.response.model', x.user_id)))
           ORDER BY x.n)
    INTO flat
    FROM (SELECT e.f, e.n, coalesce((e.f -> 'attrs' ->> 'user.id')::uuid, ingest_otlp.default_user_id) AS user_id
          FROM jsonb_array_elements(flat) WITH ORDINALITY AS e(f, n)) x;

    -- Conversations seen for the first time, with the model of their earliest span. One
    -- of a tracked model is inserted untagged and then tagged by ensure_session_tag, under
    -- its row lock: a concurrent export that inserts the same conversation waits for this
    -- one and skips its row, and as it took no number for it, no number is lost.
    FOR fresh_conversation IN
        WITH fresh AS (
            SELECT DISTINCT ON (1, 2) (e.f ->> 'user_id')::uuid AS user_id, e.f ->> 'external_id' AS external_id,
                   (e.f ->> 'model_id')::uuid AS model_id
            FROM jsonb_array_elements(flat) AS e(f)
            WHERE e.f ->> 'external_id' IS NOT NULL
              AND NOT EXISTS (SELECT FROM sessiontag.conversations v
                              WHERE v.user_id = (e.f ->> 'user_id')::uuid AND v.external_id = e.f ->> 'external_id')
            ORDER BY 1, 2, e.f ->> 'model_id' IS NULL, sessiontag._otlp_time(e.f -> 'span' -> 'startTimeUnixNano')
        ), created AS (
            INSERT INTO sessiontag.conversations AS c (user_id, external_id, llm_model_id)
            SELECT f.user_id, f.external_id, CASE WHEN m.tracked THEN NULL ELSE f.model_id END
            FROM fresh f LEFT JOIN sessiontag.llm_models m ON m.id = f.model_id
            ORDER BY f.user_id, f.external_id
            ON CONFLICT ON CONSTRAINT conversations_user_id_external_id_key DO NOTHING
            RETURNING c.user_id, c.id, c.external_id
        )
        SELECT x.user_id, x.id, f.model_id
        FROM created x JOIN fresh f ON f.user_id = x.user_id AND f.external_id = x.external_id
        JOIN sessiontag.llm_models m ON m.id = f.model_id AND m.tracked
        ORDER BY x.user_id, f.model_id, x.id
    LOOP
        PERFORM sessiontag.ensure_session_tag(fresh_conversation.id, fresh_conversation.model_id,
                                              fresh_conversation.user_id);
    END LOOP;

    SELECT jsonb_agg(jsonb_build_object(
               'user_id', o.f -> 'user_id',
               'trace_id', o.f -> 'span' ->> 'traceId',
               'span_id', o.f -> 'span' ->> 'spanId',
               'parent_span_id', nullif(o.f -> 'span' ->> 'parentSpanId', ''),
               'span_name', o.f -> 'span' ->> 'name',
               'operation_type', CASE
                   WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' IN ('chat', 'text_completion', 'generate_content')
                       THEN 'llm_call'
                   WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' = 'execute_tool' THEN 'tool'
                   WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' = 'embeddings' THEN 'embedding'
                   WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' IS NOT NULL THEN o.f -> 'attrs' ->> 'gen_ai.operation.name'
                   WHEN o.f -> 'attrs' ? 'gen_ai.request.model' OR o.f -> 'attrs' ? 'gen_ai.response.model' THEN 'llm_call'
                   ELSE 'internal' END,
               'conversation_id', (SELECT v.id FROM sessiontag.conversations v
                                   WHERE v.user_id = (o.f ->> 'user_id')::uuid AND v.external_id = o.f ->> 'external_id'),
               'model_id', o.f -> 'model_id',
               'model_name', CASE WHEN o.f ->> 'model_id' IS NULL
                                  THEN coalesce(o.f -> 'attrs' ->> 'gen_ai.response.model',
                                                o.f -> 'attrs' ->> 'gen_ai.request.model') END,
               'model_provider', coalesce(o.f -> 'attrs' ->> 'gen_ai.provider.name', o.f -> 'attrs' ->> 'gen_ai.system'),
               'start_time', sessiontag._otlp_time(o.f -> 'span' -> 'startTimeUnixNano'),
               'end_time', sessiontag._otlp_time(o.f -> 'span' -> 'endTimeUnixNano'),
               'status', CASE WHEN sessiontag._otlp_time(o.f -> 'span' -> 'endTimeUnixNano') IS NULL THEN 'running'
                              WHEN o.f -> 'span' -> 'status' ->> 'code' IN ('2', 'STATUS_CODE_ERROR') THEN 'error'
                              ELSE 'success' END,
               'error_message', CASE WHEN o.f -> 'span' -> 'status' ->> 'code' IN ('2', 'STATUS_CODE_ERROR')
                                     THEN coalesce(nullif(o.f -> 'span' -> 'status' ->> 'message', ''), 'error') END,
               'input_tokens', coalesce(o.f -> 'attrs' -> 'gen_ai.usage.input_tokens',
                                        o.f -> 'attrs' -> 'gen_ai.usage.prompt_tokens'),
               'output_tokens', coalesce(o.f -> 'attrs' -> 'gen_ai.usage.output_tokens',
                                         o.f -> 'attrs' -> 'gen_ai.usage.completion_tokens'),
               'metadata', jsonb_build_object('otel', jsonb_build_object(
                   'attributes', sessiontag._otlp_attributes(o.f -> 'span' -> 'attributes'),
                   'kind', o.f -> 'span' -> 'kind'))
           ) ORDER BY o.n),
           array_agg(o.f ->> 'path' ORDER BY o.n)
    INTO spans, paths
    FROM jsonb_array_elements(flat) WITH ORDINALITY AS o(f, n);

    BEGIN
        RETURN sessiontag.ingest_traces(spans);
    EXCEPTION WHEN OTHERS THEN
        -- ingest_traces names spans[i].field; say which OTLP span that was.
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
        idx := substring(err_message FROM '^spans\[(\d+)\]')::integer;
        IF idx IS NOT NULL THEN
            err_message := paths[idx + 1] || substring(err_message FROM '^spans\[\d+\](.*)$');
        END IF;
        RAISE EXCEPTION USING MESSAGE = err_message, ERRCODE = err_state;
    END;
END
$$;

REVOKE ALL ON FUNCTION sessiontag._iso_time_pattern() FROM PUBLIC;
REVOKE ALL ON FUNCTION sessiontag._span_text_fields() FROM PUBLIC;
