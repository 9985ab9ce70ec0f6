-- sessiontag: batch ingestion.
--
-- Two doors, one mover. A caller that speaks COPY streams spans into the staging table its
-- session owns (create_span_staging) and calls ingest_staged_spans; a caller with only SQL
-- passes a JSON array to ingest_traces, which checks what only JSON can get wrong (keys,
-- value types, time formats) and fills the same staging. Either way _ingest_staged moves
-- the staged rows into llm_traces in set-based statements, with every rule of
-- record_trace (sql/40_traces.sql holds the checks it shares with the one-span functions).
--
-- Staged rows live only as long as their transaction (ON COMMIT DELETE ROWS), and the
-- mover empties the staging after each call, so no batch leaks into the next.

-- This session's staging table, created on first use: pg_temp.sessiontag_spans, one column
-- per record_trace parameter, in its order and of its type. Created by the owner (SECURITY
-- DEFINER), so that only sessiontag's functions read it as the owner; the caller may
-- INSERT (COPY) and SELECT. A temporary table is private to its session: two sessions
-- ingesting at once never see each other's rows.
CREATE FUNCTION sessiontag.create_span_staging()
RETURNS regclass
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    staging regclass := to_regclass('pg_temp.sessiontag_spans');
BEGIN
    PERFORM sessiontag._check_user();  -- a user-scoped caller needs its user set, as everywhere
    IF staging IS NULL THEN
        CREATE TEMPORARY TABLE sessiontag_spans (
            user_id         uuid,
            trace_id        text,
            span_id         text,
            span_name       text,
            operation_type  text,
            conversation_id uuid,
            parent_span_id  text,
            model_id        uuid,
            model_name      text,
            model_provider  text,
            session_tag     text,
            input_data      jsonb,
            metadata        jsonb,
            start_time      timestamptz,
            status          text,
            output_data     jsonb,
            input_tokens    integer,
            output_tokens   integer,
            cost_usd        numeric,
            error_message   text,
            end_time        timestamptz,
            message_id      text
        ) ON COMMIT DELETE ROWS;
        GRANT SELECT, INSERT ON pg_temp.sessiontag_spans TO sessiontag_app, sessiontag_user;
        RETURN 'pg_temp.sessiontag_spans'::regclass;
    END IF;
    -- A table of that name made by anyone else is not one to read as the owner.
    IF NOT EXISTS (SELECT FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
                   WHERE c.oid = staging AND c.relkind = 'r' AND r.rolname = current_user) THEN
        RAISE EXCEPTION 'pg_temp.sessiontag_spans was not created by sessiontag.create_span_staging()'
            USING ERRCODE = 'duplicate_table', HINT = 'Drop it; sessiontag.create_span_staging() makes it anew.';
    END IF;
    RETURN staging;
END
$$;

-- Raised from inside the mover's statements when a row fails a check no constraint makes;
-- the public functions then name the first bad row and field.
CREATE FUNCTION sessiontag._invalid_span()
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'a span is not valid' USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- Tags the staged spans' untagged conversations (analytics on), once each, with the first
-- tracked model their spans name, else their own model. Locks are taken in (user, model,
-- conversation) order, so concurrent batches cannot deadlock on them. The staging is read
-- in a materialized CTE of its own (its row order, ctid, means nothing outside it: on
-- Citus the rest of the query runs elsewhere), with the tracked models read first.
CREATE FUNCTION sessiontag._ingest_tag()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tracked uuid[];
    r record;
BEGIN
    SELECT coalesce(array_agg(m.id), '{}') INTO tracked FROM sessiontag.llm_models m WHERE m.tracked;
    FOR r IN
        WITH staged AS MATERIALIZED (
            SELECT s.user_id, s.conversation_id,
                   (array_agg(s.model_id ORDER BY s.ctid) FILTER (WHERE s.model_id = ANY (tracked)))[1] AS model_id
            FROM pg_temp.sessiontag_spans s
            WHERE s.conversation_id IS NOT NULL
            GROUP BY s.user_id, s.conversation_id
        )
        SELECT c.user_id, c.id AS conversation_id, x.model_id, c.llm_model_id
        FROM staged x
        JOIN sessiontag.conversations c ON c.user_id = x.user_id AND c.id = x.conversation_id
        WHERE c.session_id IS NULL AND c.analytics_enabled
        ORDER BY 1, coalesce(x.model_id, c.llm_model_id), 2
    LOOP
        PERFORM sessiontag.ensure_session_tag(r.conversation_id, r.model_id, r.user_id);
    END LOOP;
END
$$;

-- Ends the stored running spans that the staged finished spans end (from earlier calls or
-- earlier in the batch); returns how many. An end before the stored start breaks
-- llm_traces' CHECK (end_time >= start_time), and the caller's diagnosis names the row.
CREATE FUNCTION sessiontag._ingest_complete()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    completed integer;
BEGIN
    WITH f AS MATERIALIZED (
        -- The first finished staged row of each span ends it (the staging read on its own,
        -- see _ingest_tag).
        SELECT DISTINCT ON (s.user_id, s.trace_id, s.span_id)
               s.user_id, s.trace_id, s.span_id, coalesce(s.status, 'success') AS status,
               coalesce(s.end_time, now()) AS end_time, s.output_data, s.input_tokens, s.output_tokens,
               s.cost_usd, s.error_message
        FROM pg_temp.sessiontag_spans s
        WHERE s.status IS DISTINCT FROM 'running'
        ORDER BY s.user_id, s.trace_id, s.span_id, s.ctid
    ), ended AS (
        UPDATE sessiontag.llm_traces t
        SET status = f.status,
            end_time = f.end_time,
            output_data = coalesce(f.output_data, t.output_data),
            input_tokens = coalesce(f.input_tokens, t.input_tokens),
            output_tokens = coalesce(f.output_tokens, t.output_tokens),
            cost_usd = coalesce(f.cost_usd, t.cost_usd),
            error_message = coalesce(f.error_message, t.error_message)
        FROM f
        WHERE t.user_id = f.user_id AND t.trace_id = f.trace_id AND t.span_id = f.span_id AND t.status = 'running'
        RETURNING 1)
    SELECT count(*) INTO completed FROM ended;
    RETURN completed;
END
$$;

-- The statement that inserts spans from source (a staging table or the JSON source of
-- ingest_traces, as "... s") and yields how many it inserted, counted with RETURNING.
-- plain: without ON CONFLICT (its speculative insertion costs about a tenth of the
-- insert) and only spans of tagged conversations (or none): the fast path, which a unique
-- violation sends to the careful form, the other one, which skips stored spans and takes
-- the conversations _ingest_tag has tagged meanwhile. The checks the table's constraints
-- do not make are one CASE, so every row is checked before it can be skipped (separate
-- quals could be reordered); they mirror _element_problem, which names the problem.
-- Dynamic SQL: both forms and both sources are one text, and a batch is planned once.
CREATE FUNCTION sessiontag._ingest_insert_sql(source text, plain boolean)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN format($sql$
    WITH inserted AS (
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
        FROM %1$s
        LEFT JOIN sessiontag.conversations c ON c.user_id = s.user_id AND c.id = s.conversation_id
        LEFT JOIN sessiontag.llm_models m ON m.id = s.model_id
                                          AND (m.owner_id IS NULL OR m.owner_id = s.user_id)
        WHERE CASE
            WHEN s.cost_usd = 'NaN' OR NOT isfinite(s.start_time) OR NOT isfinite(s.end_time)
              -- one match over the three ids (the separator matches nothing)
              OR concat(s.trace_id, '/', s.span_id, '/', s.parent_span_id) ~ '[[:space:][:cntrl:]]'
              OR s.parent_span_id = s.span_id
              OR s.model_name = '' OR s.model_provider = '' OR s.message_id = ''
              OR s.session_tag = '' OR length(s.session_tag) > 200
              OR jsonb_typeof(s.metadata) <> 'object'
              OR (s.status = 'running' AND s.end_time IS NOT NULL)
              OR (s.model_id IS NOT NULL AND m.id IS NULL)
              OR (s.conversation_id IS NOT NULL
                  AND (c.id IS NULL OR (s.session_tag IS NOT NULL AND s.session_tag IS DISTINCT FROM c.session_id)))
            THEN sessiontag._invalid_span()
            WHEN s.conversation_id IS NULL THEN true
            ELSE c.analytics_enabled AND %2$s
        END
        %3$s
        RETURNING 1)
    SELECT count(*) FROM inserted
    $sql$,
        _ingest_insert_sql.source,
        CASE WHEN _ingest_insert_sql.plain THEN 'c.session_id IS NOT NULL' ELSE 'true' END,
        CASE WHEN _ingest_insert_sql.plain THEN ''
             ELSE 'ON CONFLICT ON CONSTRAINT llm_traces_user_id_trace_id_span_id_key DO NOTHING' END);
END
$$;

-- The mover: stores the staged spans, empties the staging, and returns how many rows took
-- effect (inserted a span, or ended a running one). On a bad row it raises without naming
-- it; its callers do, each in its own terms. scoped: the only user_id allowed, if any.
-- careful: skip the fast path (the caller knows some spans are stored already).
--
-- The fast insert takes spans of tagged conversations only. Only when it did not take
-- every row (untagged conversations, analytics off, spans stored before: a unique
-- violation undoes it) do the tagging, the careful insert and the completion run.
CREATE FUNCTION sessiontag._ingest_staged(scoped uuid, careful boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off  -- compiling a batch's statements costs more than running them
AS $$
DECLARE
    n bigint;
    more bigint;
    stored bigint := 0;
BEGIN
    SELECT count(*) INTO n FROM pg_temp.sessiontag_spans;
    IF n = 0 THEN
        RETURN 0;
    END IF;
    IF _ingest_staged.scoped IS NOT NULL
       AND EXISTS (SELECT FROM pg_temp.sessiontag_spans s WHERE s.user_id <> _ingest_staged.scoped) THEN
        PERFORM sessiontag._invalid_span();
    END IF;
    IF NOT _ingest_staged.careful THEN
        BEGIN
            EXECUTE sessiontag._ingest_insert_sql('pg_temp.sessiontag_spans s', true) INTO stored;
        EXCEPTION WHEN unique_violation THEN
            stored := 0;
        END;
    END IF;
    IF stored < n THEN
        PERFORM sessiontag._ingest_tag();
        EXECUTE sessiontag._ingest_insert_sql('pg_temp.sessiontag_spans s', false) INTO more;
        stored := stored + more + sessiontag._ingest_complete();
    END IF;
    DELETE FROM pg_temp.sessiontag_spans;
    RETURN stored;
END
$$;

-- The first problem of one span, as record_trace (or, with status running, start_trace)
-- would report it: shape, unknown keys, each field's type, then the values and
-- references. elem: an ingest_traces element, or a staged row as JSON (typed: its columns
-- had their types already, so only the values and references are left to judge).
-- batch_start: the start of this span where an earlier element of the batch started it.
-- Only run after the mover failed, to name the culprit.
CREATE FUNCTION sessiontag._element_problem(elem jsonb, typed boolean DEFAULT false,
                                            batch_start timestamptz DEFAULT NULL)
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
    IF _element_problem.typed THEN
        FOREACH field IN ARRAY ARRAY['start_time', 'end_time'] LOOP
            IF _element_problem.elem ->> field IN ('infinity', '-infinity') THEN
                RETURN ROW(field, 'must be a finite time', '22008')::sessiontag._problem;
            END IF;
        END LOOP;
    ELSE
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
    END IF;
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
    -- Ending a span stored running (by an earlier call, else earlier in the batch): the end
    -- follows the stored start.
    SELECT t.start_time INTO stored_start FROM sessiontag.llm_traces t
    WHERE t.user_id = s.user_id AND t.trace_id = s.trace_id AND t.span_id = s.span_id AND t.status = 'running';
    RETURN sessiontag._end_problem(s.status, s.input_tokens, s.output_tokens, s.cost_usd, s.end_time,
                                   coalesce(stored_start, _element_problem.batch_start));
END
$$;

-- Raises the error of a failed batch: the first bad span's problem when the error was
-- bad data (a cast, a constraint, a check: classes 22 and 23, and P0002 for a missing
-- reference), named 'spans[3].field: ...' (spans: the JSON array of ingest_traces) or
-- 'row 3: field: ...' (spans NULL: the staged rows, counted from 1 in the order they were
-- written); else the error as it was (a lock timeout, a deadlock, ...). The elements are
-- judged in order, each as if the earlier ones were stored: another user's span for a
-- user-scoped caller (scoped), then _element_problem's.
CREATE FUNCTION sessiontag._diagnose(spans jsonb, scoped uuid, err_state text, err_message text, err_detail text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    typed boolean := _diagnose.spans IS NULL;
    elems jsonb := _diagnose.spans;
    message text := _diagnose.err_message;
    started jsonb := '{}'::jsonb;  -- span key -> start, of the spans started earlier in the batch
    elem jsonb;
    n bigint;
    span_key text;
    other boolean;
    p sessiontag._problem;
BEGIN
    IF left(_diagnose.err_state, 2) IN ('22', '23') OR _diagnose.err_state = 'P0002' THEN
        IF typed THEN
            SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.ctid), '[]') INTO elems FROM pg_temp.sessiontag_spans s;
        END IF;
        FOR elem, n IN SELECT e.elem, e.n FROM jsonb_array_elements(elems) WITH ORDINALITY AS e(elem, n) LOOP
            p := NULL;
            IF _diagnose.scoped IS NOT NULL AND jsonb_typeof(elem) = 'object' THEN
                BEGIN
                    other := (elem ->> 'user_id')::uuid <> _diagnose.scoped;
                EXCEPTION WHEN invalid_text_representation THEN
                    other := false;  -- not a UUID: _element_problem says so
                END;
                IF other THEN
                    p := ROW('user_id', format('%s is not the user of this session (sessiontag.user_id)',
                                               elem ->> 'user_id'), '42501')::sessiontag._problem;
                END IF;
            END IF;
            span_key := concat_ws(' ', elem ->> 'user_id', elem ->> 'trace_id', elem ->> 'span_id');
            p := coalesce(p, sessiontag._element_problem(elem, typed, (started ->> span_key)::timestamptz));
            PERFORM sessiontag._raise(p, CASE WHEN typed THEN format('row %s: ', n) ELSE format('spans[%s].', n - 1) END);
            IF elem ->> 'status' = 'running' AND NOT started ? span_key THEN
                started := started || jsonb_build_object(span_key, coalesce(elem ->> 'start_time', now()::text));
            END IF;
        END LOOP;
        message := CASE WHEN typed THEN 'rows: ' ELSE 'spans: ' END || message;
    END IF;
    IF coalesce(_diagnose.err_detail, '') = '' THEN
        RAISE EXCEPTION USING MESSAGE = message, ERRCODE = _diagnose.err_state;
    END IF;
    RAISE EXCEPTION USING MESSAGE = message, ERRCODE = _diagnose.err_state, DETAIL = _diagnose.err_detail;
END
$$;

-- Stores the rows this transaction put in the staging table (pg_temp.sessiontag_spans, see
-- create_span_staging), empties it, and returns how many took effect: inserted a span, or
-- ended a running one. The rules are ingest_traces': all or nothing (on bad input it
-- raises, naming the first bad row, counted from 1 in the order the rows were written, and
-- its field: 'row 3: status: ...', and stores nothing), stored spans are not stored again
-- (a finished one ends a stored running one), spans of conversations with analytics off
-- are skipped, and neither counts. A user-scoped caller may only store its own user's
-- spans (42501 names the first other one).
--
-- The staging keeps rows for their transaction only: COPY and this call belong in one.
CREATE FUNCTION sessiontag.ingest_staged_spans()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
    err_state text;
    err_message text;
    err_detail text;
BEGIN
    PERFORM sessiontag.create_span_staging();
    RETURN sessiontag._ingest_staged(scoped);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                            err_detail = PG_EXCEPTION_DETAIL;
    PERFORM sessiontag._diagnose(NULL, scoped, err_state, err_message, err_detail);
    RETURN NULL;  -- not reached: _diagnose raises
END
$$;

-- Stores a JSON array of finished or started spans (keys: record_trace's parameter
-- names; status running and no end_time for a started span) and returns how many of its
-- elements took effect: inserted a span, or ended a running one. All or nothing: on bad
-- input it raises, naming the first bad element and field ('spans[3].status: ...'), and
-- stores nothing. Spans already stored are not stored again (a finished one ends a stored
-- running one); spans of conversations with analytics off are skipped. Neither counts.
-- A user-scoped caller may only store spans of its own user_id: the first other one is
-- refused with 42501, naming it ('spans[3].user_id: ...').
--
-- The staging must hold no rows of a COPY not yet ingested: the mover would take them too.
CREATE FUNCTION sessiontag.ingest_traces(spans jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off  -- compiling the batch's statements costs more than running them
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
    -- The spans as staging rows ($1: spans, $2: scoped), after the checks only JSON needs
    -- (they mirror the JSON part of _element_problem); the times are cast only after
    -- them. OFFSET 0 keeps these checks first, below the mover's, and casts each time once
    -- (flattened, the mover's checks would cast it again). The checks are written for
    -- speed (they were a fifth of the call's own work): a text field is looked at in the JSON
    -- only when the record has a value for it (a JSON null or a missing key is none), and
    -- a time is matched against _iso_time_pattern()'s rule by translate() rather than a
    -- regular expression (half the cost).
    json_source CONSTANT text := $sql$(
        SELECT r.user_id, r.trace_id, r.span_id, r.span_name, r.operation_type, r.conversation_id,
               r.parent_span_id, r.model_id, r.model_name, r.model_provider, r.session_tag, r.input_data,
               r.metadata, r.start_time::timestamptz AS start_time, r.status, r.output_data, r.input_tokens,
               r.output_tokens, r.cost_usd, r.error_message, r.end_time::timestamptz AS end_time, r.message_id
        FROM jsonb_array_elements($1) AS e(elem)
        -- One record per element, beside it (Citus cannot plan ROWS FROM of two functions).
        CROSS JOIN LATERAL jsonb_to_record(e.elem) AS r(
                user_id uuid, trace_id text, span_id text, span_name text, operation_type text,
                conversation_id uuid, parent_span_id text, model_id uuid, model_name text, model_provider text,
                session_tag text, input_data jsonb, metadata jsonb, start_time text, status text,
                output_data jsonb, input_tokens integer, output_tokens integer, cost_usd numeric,
                error_message text, end_time text, message_id text)
        WHERE CASE
            WHEN e.elem - sessiontag._span_fields() <> '{}'::jsonb
              -- _span_text_fields(), written out: a subquery over it per row would cost more.
              OR (r.trace_id IS NOT NULL AND jsonb_typeof(e.elem -> 'trace_id') <> 'string')
              OR (r.span_id IS NOT NULL AND jsonb_typeof(e.elem -> 'span_id') <> 'string')
              OR (r.parent_span_id IS NOT NULL AND jsonb_typeof(e.elem -> 'parent_span_id') <> 'string')
              OR (r.span_name IS NOT NULL AND jsonb_typeof(e.elem -> 'span_name') <> 'string')
              OR (r.operation_type IS NOT NULL AND jsonb_typeof(e.elem -> 'operation_type') <> 'string')
              OR (r.model_name IS NOT NULL AND jsonb_typeof(e.elem -> 'model_name') <> 'string')
              OR (r.model_provider IS NOT NULL AND jsonb_typeof(e.elem -> 'model_provider') <> 'string')
              OR (r.session_tag IS NOT NULL AND jsonb_typeof(e.elem -> 'session_tag') <> 'string')
              OR (r.status IS NOT NULL AND jsonb_typeof(e.elem -> 'status') <> 'string')
              OR (r.error_message IS NOT NULL AND jsonb_typeof(e.elem -> 'error_message') <> 'string')
              OR (r.message_id IS NOT NULL AND jsonb_typeof(e.elem -> 'message_id') <> 'string')
              -- ^[0-9]{4}-[0-9]{2}-[0-9]{2}, as _iso_time_pattern() says
              OR translate(left(r.start_time, 10), '123456789', '000000000') <> '0000-00-00'
              OR translate(left(r.end_time, 10), '123456789', '000000000') <> '0000-00-00'
              OR r.user_id <> $2
            THEN sessiontag._invalid_span()
            ELSE true
        END
        OFFSET 0) s$sql$;
    stored bigint;
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
    IF jsonb_array_length(ingest_traces.spans) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM sessiontag.create_span_staging();
    IF EXISTS (SELECT FROM pg_temp.sessiontag_spans) THEN
        RAISE EXCEPTION 'the span staging holds rows not yet ingested'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call sessiontag.ingest_staged_spans() for them first.';
    END IF;
    BEGIN
        -- The fast path: straight from the JSON into llm_traces (no staging to write and
        -- read), when every span goes in. Otherwise through the staging and the mover.
        BEGIN
            EXECUTE sessiontag._ingest_insert_sql(json_source, true) INTO stored USING ingest_traces.spans, scoped;
        EXCEPTION WHEN unique_violation THEN
            stored := 0;
        END;
        IF stored < jsonb_array_length(ingest_traces.spans) THEN
            EXECUTE 'INSERT INTO pg_temp.sessiontag_spans SELECT s.* FROM ' || json_source
                USING ingest_traces.spans, scoped;
            stored := stored + sessiontag._ingest_staged(scoped, stored > 0);
        END IF;
        RETURN stored;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                                err_detail = PG_EXCEPTION_DETAIL;
    END;
    PERFORM sessiontag._diagnose(ingest_traces.spans, scoped, err_state, err_message, err_detail);
    RETURN NULL;  -- not reached: _diagnose raises
END
$$;
