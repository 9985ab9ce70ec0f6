-- sessiontag: trace recording.
--
-- start_trace / end_trace / record_trace write one span; batches go through
-- sql/45_ingest.sql and OpenTelemetry exports through sql/47_otlp.sql. Every trace of a conversation carries the conversation's
-- session tag, read from the conversation at write time (never trusted from the caller),
-- so no message can lose it. A conversation with analytics off records nothing.
-- (user_id, trace_id, span_id) identifies a span: a retried call returns the same row and
-- never undoes an end already recorded. duration_ms is a generated column.
--
-- Bad input raises before anything is stored. The checks live in the _*_problem helpers,
-- which return the first problem as (field, problem, sqlstate); _raise turns it into
-- "field problem" for single calls and "spans[i].field: problem" for ingest_traces.

CREATE TYPE sessiontag._problem AS (
    field    text,
    problem  text,
    sqlstate text
);

-- Raises p ("field problem", or with a prefix naming the span, "spans[3].field: problem"
-- or "row 3: field: problem") with its SQLSTATE and the field as the error's column name;
-- returns true when p is NULL, so it can also guard a row inside a query.
CREATE FUNCTION sessiontag._raise(p sessiontag._problem, prefix text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF _raise.p.field IS NULL THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION USING
        MESSAGE = CASE WHEN _raise.prefix IS NULL THEN _raise.p.field || ' ' || _raise.p.problem
                       WHEN _raise.p.field = '' THEN rtrim(_raise.prefix, '.: ') || ': ' || _raise.p.problem
                       ELSE _raise.prefix || _raise.p.field || ': ' || _raise.p.problem END,
        ERRCODE = _raise.p.sqlstate,
        COLUMN = _raise.p.field;
END
$$;

-- The keys a span may have in ingest_traces: record_trace's parameter names.
CREATE FUNCTION sessiontag._span_fields()
RETURNS text[]
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['user_id', 'trace_id', 'span_id', 'span_name', 'operation_type', 'conversation_id',
                 'parent_span_id', 'model_id', 'model_name', 'model_provider', 'session_tag', 'input_data',
                 'metadata', 'start_time', 'status', 'output_data', 'input_tokens', 'output_tokens', 'cost_usd',
                 'error_message', 'end_time', 'message_id']
$$;

-- The span fields that hold text: in ingest_traces, a JSON string (or null) only; a
-- number, boolean, array or object there is a caller's bug, not text to keep.
CREATE FUNCTION sessiontag._span_text_fields()
RETURNS text[]
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['trace_id', 'span_id', 'span_name', 'operation_type', 'parent_span_id', 'model_name',
                 'model_provider', 'session_tag', 'status', 'error_message', 'message_id']
$$;

-- How a time in ingest_traces begins: an ISO 8601 date (2026-11-24, 2026-11-24T09:30:00Z,
-- 2026-11-24 09:30:00.123456+01:00; without an offset, in the session's TimeZone). So no
-- PostgreSQL word ('now', 'yesterday', 'epoch', ...) and no form whose meaning depends on
-- DateStyle ('1/2/2026'). Only the start is matched: the cast checks the rest, and a full
-- pattern would cost ingest_traces several percent.
CREATE FUNCTION sessiontag._iso_time_pattern()
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '^[0-9]{4}-[0-9]{2}-[0-9]{2}'
$$;

-- An OpenTelemetry-style id: 1 to 128 characters, no whitespace or control characters
-- (a trailing newline or a blank id is a caller's bug, not an id). NULL when fine.
CREATE FUNCTION sessiontag._id_problem(field text, value text, required boolean)
RETURNS sessiontag._problem
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN _id_problem.value IS NULL THEN
            CASE WHEN _id_problem.required
                 THEN ROW(_id_problem.field, 'must not be NULL', '22004')::sessiontag._problem END
        WHEN _id_problem.value = '' THEN
            ROW(_id_problem.field, 'must not be empty', '22023')::sessiontag._problem
        WHEN length(_id_problem.value) > 128 THEN
            ROW(_id_problem.field, 'is longer than 128 characters', '22001')::sessiontag._problem
        WHEN _id_problem.value ~ '[[:space:][:cntrl:]]' THEN
            ROW(_id_problem.field, 'must not contain whitespace or control characters', '22023')::sessiontag._problem
    END
$$;

-- A span's name-like text: NULL (when optional) or 1 to max_length characters.
CREATE FUNCTION sessiontag._text_problem(field text, value text, max_length integer, required boolean)
RETURNS sessiontag._problem
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN _text_problem.value IS NULL THEN
            CASE WHEN _text_problem.required
                 THEN ROW(_text_problem.field, 'must not be NULL', '22004')::sessiontag._problem END
        WHEN _text_problem.value = '' THEN
            ROW(_text_problem.field, 'must not be empty', '22023')::sessiontag._problem
        WHEN length(_text_problem.value) > _text_problem.max_length THEN
            ROW(_text_problem.field, format('is longer than %s characters', _text_problem.max_length),
                '22001')::sessiontag._problem
    END
$$;

-- The first problem of a span's start: its identity and what start_trace records.
CREATE FUNCTION sessiontag._start_problem(
    user_id uuid,
    trace_id text,
    span_id text,
    span_name text,
    operation_type text,
    parent_span_id text,
    model_name text,
    model_provider text,
    session_tag text,
    metadata jsonb,
    start_time timestamptz,
    message_id text
)
RETURNS sessiontag._problem
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p sessiontag._problem;
BEGIN
    IF _start_problem.user_id IS NULL THEN
        RETURN ROW('user_id', 'must not be NULL', '22004')::sessiontag._problem;
    END IF;
    p := coalesce(sessiontag._id_problem('trace_id', _start_problem.trace_id, true),
                  sessiontag._id_problem('span_id', _start_problem.span_id, true),
                  sessiontag._text_problem('span_name', _start_problem.span_name, 200, true),
                  sessiontag._text_problem('operation_type', _start_problem.operation_type, 100, true),
                  sessiontag._id_problem('parent_span_id', _start_problem.parent_span_id, false));
    IF p.field IS NOT NULL THEN
        RETURN p;
    END IF;
    -- A span cannot be its own parent: get_trace would loop.
    IF _start_problem.parent_span_id = _start_problem.span_id THEN
        RETURN ROW('parent_span_id', 'must differ from span_id', '22023')::sessiontag._problem;
    END IF;
    p := coalesce(sessiontag._text_problem('model_name', _start_problem.model_name, 200, false),
                  sessiontag._text_problem('model_provider', _start_problem.model_provider, 200, false),
                  sessiontag._text_problem('session_tag', _start_problem.session_tag, 200, false),
                  sessiontag._text_problem('message_id', _start_problem.message_id, 200, false));
    IF p.field IS NOT NULL THEN
        RETURN p;
    END IF;
    IF jsonb_typeof(_start_problem.metadata) <> 'object' THEN
        RETURN ROW('metadata', format('must be a JSON object, got %s', jsonb_typeof(_start_problem.metadata)),
                   '22023')::sessiontag._problem;
    END IF;
    IF _start_problem.start_time IS NULL THEN
        RETURN ROW('start_time', 'must not be NULL', '22004')::sessiontag._problem;
    END IF;
    IF NOT isfinite(_start_problem.start_time) THEN
        RETURN ROW('start_time', 'must be a finite time', '22008')::sessiontag._problem;
    END IF;
    RETURN NULL;
END
$$;

-- The first problem of a span's end. running_allowed: ingest_traces also takes started
-- spans (status running, no end_time); end_trace and record_trace take finished ones.
CREATE FUNCTION sessiontag._end_problem(
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

-- The first problem with what a span refers to: the user's conversation, a registered
-- model, and a caller-supplied session_tag, which must be the conversation's own (a
-- trace carries its conversation's tag; a different one is a caller's bug, refused
-- rather than silently replaced). Another user's private model does not exist for the
-- span's user.
CREATE FUNCTION sessiontag._refs_problem(user_id uuid, conversation_id uuid, model_id uuid, session_tag text)
RETURNS sessiontag._problem
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    conv sessiontag.conversations;
BEGIN
    IF _refs_problem.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = _refs_problem.model_id
                       AND (m.owner_id IS NULL OR m.owner_id = _refs_problem.user_id)) THEN
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

-- Ends a running span: sets its end and usage (usage given at the start stays unless
-- given again). A span already ended is left as it is, so a retried end changes nothing.
-- Returns the row id; NULL when there is no such span.
CREATE FUNCTION sessiontag._finish_span(
    user_id uuid,
    trace_id text,
    span_id text,
    status text,
    output_data jsonb,
    input_tokens integer,
    output_tokens integer,
    cost_usd numeric,
    error_message text,
    end_time timestamptz
)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    span sessiontag.llm_traces;
BEGIN
    -- The row lock makes concurrent ends of one span queue: the first one wins.
    SELECT * INTO span FROM sessiontag.llm_traces t
    WHERE t.user_id = _finish_span.user_id AND t.trace_id = _finish_span.trace_id AND t.span_id = _finish_span.span_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF span.status <> 'running' THEN
        RETURN span.id;
    END IF;
    PERFORM sessiontag._raise(sessiontag._end_problem(_finish_span.status, _finish_span.input_tokens,
        _finish_span.output_tokens, _finish_span.cost_usd, _finish_span.end_time, span.start_time));
    UPDATE sessiontag.llm_traces t
    SET status = _finish_span.status,
        end_time = _finish_span.end_time,
        output_data = coalesce(_finish_span.output_data, t.output_data),
        input_tokens = coalesce(_finish_span.input_tokens, t.input_tokens),
        output_tokens = coalesce(_finish_span.output_tokens, t.output_tokens),
        cost_usd = coalesce(_finish_span.cost_usd, t.cost_usd),
        error_message = coalesce(_finish_span.error_message, t.error_message)
    WHERE t.user_id = span.user_id AND t.id = span.id;
    RETURN span.id;
END
$$;

-- start_trace and record_trace: checks everything, finds the conversation's tag (tagging
-- it first when untagged and a tracked model is known), inserts the span unless
-- (user_id, trace_id, span_id) exists. An existing span is returned as it is, except
-- that a finished record_trace ends it while it is still running.
CREATE FUNCTION sessiontag._record_span(
    finished boolean,
    user_id uuid,
    trace_id text,
    span_id text,
    span_name text,
    operation_type text,
    conversation_id uuid,
    parent_span_id text,
    model_id uuid,
    model_name text,
    model_provider text,
    session_tag text,
    input_data jsonb,
    metadata jsonb,
    start_time timestamptz,
    status text,
    output_data jsonb,
    input_tokens integer,
    output_tokens integer,
    cost_usd numeric,
    error_message text,
    end_time timestamptz,
    message_id text
)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    enabled boolean;
    tag text := _record_span.session_tag;
    model sessiontag.llm_models;
    result uuid;
BEGIN
    PERFORM sessiontag._raise(sessiontag._start_problem(_record_span.user_id, _record_span.trace_id,
        _record_span.span_id, _record_span.span_name, _record_span.operation_type, _record_span.parent_span_id,
        _record_span.model_name, _record_span.model_provider, _record_span.session_tag, _record_span.metadata,
        _record_span.start_time, _record_span.message_id));
    IF _record_span.finished THEN
        PERFORM sessiontag._raise(sessiontag._end_problem(_record_span.status, _record_span.input_tokens,
            _record_span.output_tokens, _record_span.cost_usd, _record_span.end_time, _record_span.start_time));
    END IF;
    PERFORM sessiontag._raise(sessiontag._refs_problem(_record_span.user_id, _record_span.conversation_id,
        _record_span.model_id, _record_span.session_tag));

    IF _record_span.conversation_id IS NOT NULL THEN
        SELECT c.analytics_enabled, c.session_id INTO enabled, tag FROM sessiontag.conversations c
        WHERE c.user_id = _record_span.user_id AND c.id = _record_span.conversation_id;
        IF NOT enabled THEN
            -- Tracking is off: no new span is stored. A span stored while it was on is
            -- still answered, and ended if it is running (as end_trace would).
            IF _record_span.finished THEN
                RETURN sessiontag._finish_span(_record_span.user_id, _record_span.trace_id, _record_span.span_id,
                    _record_span.status, _record_span.output_data, _record_span.input_tokens,
                    _record_span.output_tokens, _record_span.cost_usd, _record_span.error_message,
                    _record_span.end_time);
            END IF;
            RETURN (SELECT t.id FROM sessiontag.llm_traces t
                    WHERE t.user_id = _record_span.user_id AND t.trace_id = _record_span.trace_id
                      AND t.span_id = _record_span.span_id);
        END IF;
        IF tag IS NULL THEN
            -- The first trace tags the conversation: with the trace's model when it is
            -- tracked, else with the conversation's own (ensure_session_tag locks the
            -- conversation, so concurrent first traces make one tag).
            tag := sessiontag.ensure_session_tag(_record_span.conversation_id,
                (SELECT m.id FROM sessiontag.llm_models m WHERE m.id = _record_span.model_id AND m.tracked),
                _record_span.user_id);
        END IF;
    END IF;
    IF _record_span.model_id IS NOT NULL THEN
        SELECT * INTO model FROM sessiontag.llm_models m WHERE m.id = _record_span.model_id;
    END IF;

    INSERT INTO sessiontag.llm_traces AS t
        (user_id, trace_id, span_id, parent_span_id, conversation_id, message_id, session_tag, span_name,
         operation_type, model_id, model_name, model_provider, start_time, end_time, status, input_tokens,
         output_tokens, cost_usd, error_message, input_data, output_data, metadata)
    VALUES (_record_span.user_id, _record_span.trace_id, _record_span.span_id, _record_span.parent_span_id,
            _record_span.conversation_id, _record_span.message_id, tag, _record_span.span_name,
            _record_span.operation_type, _record_span.model_id,
            coalesce(_record_span.model_name, model.name), coalesce(_record_span.model_provider, model.provider),
            _record_span.start_time,
            CASE WHEN _record_span.finished THEN _record_span.end_time END,
            CASE WHEN _record_span.finished THEN _record_span.status ELSE 'running' END,
            _record_span.input_tokens, _record_span.output_tokens, _record_span.cost_usd, _record_span.error_message,
            _record_span.input_data, _record_span.output_data, _record_span.metadata)
    ON CONFLICT ON CONSTRAINT llm_traces_user_id_trace_id_span_id_key DO NOTHING
    RETURNING t.id INTO result;
    IF result IS NOT NULL THEN
        RETURN result;
    END IF;

    -- A retry (or a concurrent twin, whose commit ON CONFLICT waited for): the same row.
    IF _record_span.finished THEN
        result := sessiontag._finish_span(_record_span.user_id, _record_span.trace_id, _record_span.span_id,
            _record_span.status, _record_span.output_data, _record_span.input_tokens, _record_span.output_tokens,
            _record_span.cost_usd, _record_span.error_message, _record_span.end_time);
    ELSE
        SELECT t.id INTO result FROM sessiontag.llm_traces t
        WHERE t.user_id = _record_span.user_id AND t.trace_id = _record_span.trace_id
          AND t.span_id = _record_span.span_id;
    END IF;
    IF result IS NULL THEN
        -- Only under REPEATABLE READ or SERIALIZABLE: the twin committed after our snapshot.
        RAISE EXCEPTION 'span (trace_id %, span_id %) was stored concurrently; retry', _record_span.trace_id,
            _record_span.span_id USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN result;
END
$$;

-- Starts a span (status running) and returns its row id; NULL when the conversation has
-- analytics off. The same (user_id, trace_id, span_id) again returns the same row,
-- unchanged: a retry never duplicates a span and never reopens an ended one.
-- SECURITY DEFINER, like end_trace, record_trace and ingest_traces: they write the tag
-- and may tag the conversation; a user-scoped caller may only name its own user_id.
CREATE FUNCTION sessiontag.start_trace(
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

-- Ends a running span and returns its row id. Ending a span already ended returns its id
-- and changes nothing (the first end wins), so a retried end is harmless.
CREATE FUNCTION sessiontag.end_trace(
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

-- One call for a finished span: start_trace's and end_trace's parameters. Returns the row
-- id; NULL when the conversation has analytics off. Again with the same (user_id,
-- trace_id, span_id): the same row, ended now if it was still running.
CREATE FUNCTION sessiontag.record_trace(
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

-- Trigger on conversations: when a conversation gets its tag, the traces recorded before
-- (while it had none) get it too, so every trace of a conversation carries its tag.
-- sessiontag's own functions tag a conversation by writing session_counter (the _100_tag
-- trigger writes session_id from it), hence the two columns the trigger watches.
-- SECURITY DEFINER: nobody else writes llm_traces.session_tag.
CREATE FUNCTION sessiontag._conversations_trace_tags()
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

CREATE TRIGGER _200_trace_tags
    AFTER UPDATE OF session_id, session_counter ON sessiontag.conversations
    FOR EACH ROW WHEN (OLD.session_id IS NULL AND NEW.session_id IS NOT NULL)
    EXECUTE FUNCTION sessiontag._conversations_trace_tags();

-- Trigger on conversations: a deleted conversation's traces stay, with conversation_id
-- NULL (their session_tag keeps naming the session). Before the row goes, so that the
-- foreign key finds no trace referring to it. The traces are the same user's, on the same
-- node where the table is distributed by user_id. SECURITY DEFINER: nobody else writes
-- llm_traces.
CREATE FUNCTION sessiontag._conversations_keep_traces()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE sessiontag.llm_traces t SET conversation_id = NULL
    WHERE t.user_id = OLD.user_id AND t.conversation_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE TRIGGER _400_keep_traces
    BEFORE DELETE ON sessiontag.conversations
    FOR EACH ROW EXECUTE FUNCTION sessiontag._conversations_keep_traces();
