-- Undoes 0011_bulk_ingest: ingest_traces goes back to its own statements over the JSON
-- array, and the COPY path goes. A session's staging table, if any, is left to the
-- session (it is temporary).

DROP FUNCTION sessiontag.ingest_staged_spans();
DROP FUNCTION sessiontag.create_span_staging();
DROP FUNCTION sessiontag._diagnose(jsonb, uuid, text, text, text);
DROP FUNCTION sessiontag._element_problem(jsonb, boolean, timestamptz);
DROP FUNCTION sessiontag._ingest_staged(uuid, boolean);
DROP FUNCTION sessiontag._ingest_insert_sql(text, boolean);
DROP FUNCTION sessiontag._ingest_complete();
DROP FUNCTION sessiontag._ingest_tag();
DROP FUNCTION sessiontag._invalid_span();

-- Raises p ("field problem", or "prefix.field: problem" when prefix is given) with its
-- SQLSTATE and the field as the error's column name; returns true when p is NULL, so it
-- can also guard a row inside a query.
CREATE OR REPLACE FUNCTION sessiontag._raise(p sessiontag._problem, prefix text DEFAULT NULL)
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
CREATE OR REPLACE FUNCTION sessiontag.ingest_traces(spans jsonb)
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

REVOKE ALL ON FUNCTION
    sessiontag._invalid_span(bigint),
    sessiontag._ingest_insert(jsonb, boolean),
    sessiontag._ingest_tag(jsonb),
    sessiontag._ingest_complete(jsonb),
    sessiontag._element_problem(jsonb),
    sessiontag._ingest_diagnose(jsonb)
    FROM PUBLIC;
