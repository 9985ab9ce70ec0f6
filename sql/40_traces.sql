-- sessiontag: trace recording.
--
-- start_trace / end_trace / record_trace write one span; ingest_traces writes a batch in
-- one set-based statement. Every trace of a conversation carries the conversation's
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

-- Raises p ("field problem", or "prefix.field: problem" when prefix is given) with its
-- SQLSTATE and the field as the error's column name; returns true when p is NULL, so it
-- can also guard a row inside a query.
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
                       WHEN _raise.p.field = '' THEN _raise.prefix || ': ' || _raise.p.problem
                       ELSE _raise.prefix || '.' || _raise.p.field || ': ' || _raise.p.problem END,
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

-- Raised from inside ingest_traces' statements when a row fails a check no constraint
-- makes; ingest_traces then names the first bad element and field (_ingest_diagnose).
CREATE FUNCTION sessiontag._invalid_span(idx bigint)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'spans[%] is not a valid span', _invalid_span.idx USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- Inserts the batch's new spans in one INSERT ... SELECT (the fast path of
-- ingest_traces) and returns how many it inserted. Checks the table's constraints do not
-- make are inline (a failing row calls _invalid_span). Spans of conversations with
-- analytics off are skipped; spans of untagged conversations wait for the second call
-- (with_untagged), after _ingest_tag. Existing spans are left to _ingest_complete.
CREATE FUNCTION sessiontag._ingest_insert(spans jsonb, with_untagged boolean)
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

-- Tags the batch's untagged conversations (analytics on), once each, with the first
-- tracked model their spans name, else their own model. Locks are taken in (user, model,
-- conversation) order, so concurrent batches cannot deadlock on them.
CREATE FUNCTION sessiontag._ingest_tag(spans jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT x.user_id, x.conversation_id, x.model_id
        FROM (
            SELECT c.user_id, c.id AS conversation_id, c.llm_model_id,
                   (array_agg(s.model_id ORDER BY e.idx) FILTER (WHERE m.tracked))[1] AS model_id
            FROM jsonb_array_elements(_ingest_tag.spans) WITH ORDINALITY AS e(elem, idx)
            CROSS JOIN LATERAL jsonb_to_record(e.elem) AS s(user_id uuid, conversation_id uuid, model_id uuid)
            JOIN sessiontag.conversations c ON c.user_id = s.user_id AND c.id = s.conversation_id
            LEFT JOIN sessiontag.llm_models m ON m.id = s.model_id
            WHERE c.session_id IS NULL AND c.analytics_enabled
            GROUP BY c.user_id, c.id
        ) x
        ORDER BY x.user_id, coalesce(x.model_id, x.llm_model_id), x.conversation_id
    LOOP
        PERFORM sessiontag.ensure_session_tag(r.conversation_id, r.model_id, r.user_id);
    END LOOP;
END
$$;

-- Ends the stored running spans that the batch's finished spans end (from earlier calls
-- or earlier in the batch); returns how many.
CREATE FUNCTION sessiontag._ingest_complete(spans jsonb)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    completed integer;
BEGIN
    UPDATE sessiontag.llm_traces t
    SET status = f.status,
        end_time = f.end_time,
        output_data = coalesce(f.output_data, t.output_data),
        input_tokens = coalesce(f.input_tokens, t.input_tokens),
        output_tokens = coalesce(f.output_tokens, t.output_tokens),
        cost_usd = coalesce(f.cost_usd, t.cost_usd),
        error_message = coalesce(f.error_message, t.error_message)
    FROM (
        -- The first finished element of each span ends it.
        SELECT DISTINCT ON (s.user_id, s.trace_id, s.span_id)
               e.idx - 1 AS idx, s.user_id, s.trace_id, s.span_id, coalesce(s.status, 'success') AS status,
               coalesce(s.end_time, now()) AS end_time, s.output_data, s.input_tokens, s.output_tokens,
               s.cost_usd, s.error_message
        FROM jsonb_array_elements(_ingest_complete.spans) WITH ORDINALITY AS e(elem, idx)
        CROSS JOIN LATERAL jsonb_to_record(e.elem) AS s(
            user_id uuid, trace_id text, span_id text, status text, output_data jsonb, input_tokens integer,
            output_tokens integer, cost_usd numeric, error_message text, end_time timestamptz)
        WHERE s.status IS DISTINCT FROM 'running'
        ORDER BY s.user_id, s.trace_id, s.span_id, e.idx
    ) f
    WHERE t.user_id = f.user_id AND t.trace_id = f.trace_id AND t.span_id = f.span_id AND t.status = 'running'
      AND sessiontag._raise(sessiontag._end_problem(f.status, f.input_tokens, f.output_tokens, f.cost_usd,
                                                    f.end_time, t.start_time),
                            format('spans[%s]', f.idx));
    GET DIAGNOSTICS completed = ROW_COUNT;
    RETURN completed;
END
$$;

-- The first problem of one ingest_traces element, as record_trace (or, with status
-- running, start_trace) would report it: shape, unknown keys, each field's type, then
-- the values and references. Only run after the fast path failed, to name the culprit.
CREATE FUNCTION sessiontag._element_problem(elem jsonb)
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

-- Raises the problem of the first bad element of spans, if any.
CREATE FUNCTION sessiontag._ingest_diagnose(spans jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    elem jsonb;
    idx bigint;
BEGIN
    FOR elem, idx IN
        SELECT e.elem, e.idx - 1 FROM jsonb_array_elements(_ingest_diagnose.spans) WITH ORDINALITY AS e(elem, idx)
    LOOP
        PERFORM sessiontag._raise(sessiontag._element_problem(elem), format('spans[%s]', idx));
    END LOOP;
END
$$;

-- Stores a JSON array of finished or started spans (keys: record_trace's parameter
-- names; status running and no end_time for a started span) and returns how many of its
-- elements took effect: inserted a span, or ended a running one. All or nothing: on bad input it raises, naming the first bad
-- element and field ('spans[3].status: ...'), and stores nothing. Spans already stored
-- are not stored again (a finished one ends a stored running one); spans of
-- conversations with analytics off are skipped. Neither counts.
--
-- Set-based: one INSERT ... SELECT over the whole batch. Only when it inserted fewer
-- rows than the batch holds (untagged conversations, retries, tracking off) do the
-- tagging, a second insert and the completion run; only when it failed does the
-- element-by-element diagnosis run.
--
-- A user-scoped caller may only store spans of its own user_id: the first other one is
-- refused with 42501, naming it ('spans[3].user_id: ...').
CREATE FUNCTION sessiontag.ingest_traces(spans jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
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

-- OpenTelemetry: an OTLP/JSON ExportTraceServiceRequest becomes spans of ingest_traces.
-- GenAI semantic conventions name the user (user.id, else default_user_id), the
-- conversation (gen_ai.conversation.id or session.id: a conversation's external_id,
-- created on first sight and tagged like any other), the model (gen_ai.request.model,
-- else gen_ai.response.model, as a model_key) and the usage (gen_ai.usage.*); the span
-- status gives success or error. Each span's own attributes are kept in metadata.

-- OTLP attributes ([{key, value: {stringValue | intValue | ...}}]) as one JSON object.
CREATE FUNCTION sessiontag._otlp_attributes(attributes jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(_otlp_attributes.attributes) IS DISTINCT FROM 'array' THEN
        RETURN '{}'::jsonb;
    END IF;
    RETURN coalesce((
        SELECT jsonb_object_agg(a ->> 'key', CASE
                   WHEN a -> 'value' ? 'stringValue' THEN a -> 'value' -> 'stringValue'
                   WHEN a -> 'value' ? 'intValue' THEN to_jsonb((a -> 'value' ->> 'intValue')::numeric)
                   WHEN a -> 'value' ? 'doubleValue' THEN a -> 'value' -> 'doubleValue'
                   WHEN a -> 'value' ? 'boolValue' THEN a -> 'value' -> 'boolValue'
                   ELSE a -> 'value' END)
        FROM jsonb_array_elements(_otlp_attributes.attributes) AS a
        WHERE a ->> 'key' IS NOT NULL), '{}'::jsonb);
END
$$;

-- OTLP's nanoseconds since the epoch (a JSON string or number) as a timestamptz.
CREATE FUNCTION sessiontag._otlp_time(nanos jsonb)
RETURNS timestamptz
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF _otlp_time.nanos IS NULL OR _otlp_time.nanos #>> '{}' IN ('', '0') THEN
        RETURN NULL;
    END IF;
    RETURN 'epoch'::timestamptz + ((_otlp_time.nanos #>> '{}')::numeric / 1000)::bigint * interval '1 microsecond';
END
$$;

CREATE FUNCTION sessiontag.ingest_otlp(payload jsonb, default_user_id uuid DEFAULT NULL)
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
