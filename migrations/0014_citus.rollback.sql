-- Undoes 0014_citus: ON DELETE SET NULL, the restrictive own_rows policies, the earlier
-- grants and function bodies. Citus refuses ON DELETE SET NULL on a distributed table, so
-- a distributed database is refused here: undistribute it first (undistribute_table).

DO $$
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL
       AND sessiontag._distribution('sessiontag.conversations') IS NOT NULL THEN
        RAISE EXCEPTION 'sessiontag is distributed by Citus; 0014_citus cannot be rolled back while it is'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Undistribute the tables first: SELECT undistribute_table(t) for each sessiontag table, starting with the distributed ones.';
    END IF;
END
$$;

DROP FUNCTION sessiontag.distribute(integer);
DROP FUNCTION sessiontag._distribution(regclass);

DROP POLICY access ON sessiontag.llm_models;
DROP POLICY access ON sessiontag.conversations;
DROP POLICY access ON sessiontag.llm_traces;
DROP POLICY access ON sessiontag.session_counters;
DROP POLICY access ON sessiontag.feedback;

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

CREATE POLICY access ON sessiontag.feedback TO PUBLIC
    USING ((SELECT NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER'))
           OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK ((SELECT NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER'))
                OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);

REVOKE INSERT (tracked, created_at) ON sessiontag.llm_models FROM sessiontag_app;
REVOKE INSERT (created_at) ON sessiontag.conversations FROM sessiontag_app, sessiontag_user;

-- The owner's own model first, then a shared one; NULL when none.
CREATE OR REPLACE FUNCTION sessiontag.model_id(model_key text, owner_id uuid DEFAULT NULL)
RETURNS uuid
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.id
    FROM sessiontag.llm_models m
    WHERE m.model_key = model_id.model_key
      AND (m.owner_id = model_id.owner_id OR m.owner_id IS NULL)
    ORDER BY m.owner_id IS NULL
    LIMIT 1
$$;

-- The models a user can tag with (their own and the shared ones), or every model.
CREATE OR REPLACE FUNCTION sessiontag.list_models(owner_id uuid DEFAULT NULL)
RETURNS SETOF sessiontag.llm_models
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.*
    FROM sessiontag.llm_models m
    WHERE list_models.owner_id IS NULL OR m.owner_id = list_models.owner_id OR m.owner_id IS NULL
    ORDER BY m.name, m.owner_id NULLS FIRST, m.id
$$;

-- Trigger on conversations: numbers a new conversation of a tracked model, and checks
-- every tag written. A caller may give its own session_id (a manual tag); one in the
-- automatic form must have been handed out for this user and model (generate_session_tag)
-- and be unused, so it can never collide with a number taken later. sessiontag's own
-- functions number existing conversations (ensure_session_tag, the backfill) by writing
-- session_counter, which no caller has the privilege to write: accepted only under the
-- key's lock taken in this transaction (_lock_numbers), above its reserved numbers. A tag,
-- once set, never changes, nor does the user or model of a numbered conversation. A
-- conversation uses a shared model or its own user's. SECURITY DEFINER: it reads the
-- counters; a user-scoped caller may only write its own user's conversations.
CREATE OR REPLACE FUNCTION sessiontag._conversations_tag()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    parts text[];
    number bigint;
    reserved bigint;
    top bigint;
BEGIN
    PERFORM sessiontag._check_user(NEW.user_id);
    IF TG_OP = 'UPDATE' THEN
        IF OLD.session_id IS NOT NULL AND (NEW.session_id IS DISTINCT FROM OLD.session_id
                                           OR NEW.session_counter IS DISTINCT FROM OLD.session_counter) THEN
            RAISE EXCEPTION 'conversation % already has session tag %; a tag never changes', OLD.id, OLD.session_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF OLD.session_counter IS NOT NULL AND (NEW.llm_model_id IS DISTINCT FROM OLD.llm_model_id
                                                OR NEW.user_id IS DISTINCT FROM OLD.user_id) THEN
            RAISE EXCEPTION 'conversation % is session % of its user and model; they never change', OLD.id,
                OLD.session_id USING ERRCODE = 'invalid_parameter_value';
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
        WHERE id = NEW.llm_model_id AND (owner_id IS NULL OR owner_id = NEW.user_id);
        IF NOT FOUND THEN
            RAISE EXCEPTION 'llm_model_id % is not a registered model', NEW.llm_model_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;

    IF NEW.session_id IS NULL THEN
        IF NEW.session_counter IS NOT NULL THEN
            -- sessiontag's own functions numbering a conversation under the key's lock.
            IF m.tracked AND EXISTS (SELECT FROM sessiontag.session_counters c
                                     WHERE c.user_id = NEW.user_id AND c.model_id = m.id
                                       AND c.last_xact = pg_current_xact_id()
                                       AND c.last_value < NEW.session_counter) THEN
                NEW.session_id := sessiontag._format_tag(m.short_id, NEW.session_counter);
                NEW.experiment_name := m.name;
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'session_counter is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF TG_OP = 'INSERT' AND m.tracked THEN
            NEW.session_counter := sessiontag._lock_numbers(NEW.user_id, m.id) + 1;
            NEW.session_id := sessiontag._format_tag(m.short_id, NEW.session_counter);
            NEW.experiment_name := m.name;
        END IF;
        RETURN NEW;
    END IF;

    parts := sessiontag._tag_parts(NEW.session_id);
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
        number := parts[2]::bigint;
        -- Handed out: at most the key's highest number in use (reserved, or on a conversation).
        SELECT c.last_value INTO reserved FROM sessiontag.session_counters c
        WHERE c.user_id = NEW.user_id AND c.model_id = m.id;
        SELECT max(v.session_counter) INTO top FROM sessiontag.conversations v
        WHERE v.user_id = NEW.user_id AND v.llm_model_id = m.id;
        IF m.short_id IS DISTINCT FROM parts[1]
           OR number NOT BETWEEN 1 AND greatest(coalesce(reserved, 0), coalesce(top, 0))
           OR coalesce(NEW.session_counter, number) <> number
           OR NEW.session_id <> sessiontag._format_tag(m.short_id, number) THEN
            RAISE EXCEPTION 'session_id % has the form of an automatic tag but was not issued for this user and model', NEW.session_id
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Take it from generate_session_tag in the same transaction, or choose a tag of another form.';
        END IF;
        NEW.llm_model_id := m.id;
        NEW.session_counter := number;
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

-- Tags the staged spans' untagged conversations (analytics on), once each, with the first
-- tracked model their spans name, else their own model. Locks are taken in (user, model,
-- conversation) order, so concurrent batches cannot deadlock on them.
CREATE OR REPLACE FUNCTION sessiontag._ingest_tag()
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
                   (array_agg(s.model_id ORDER BY s.ctid) FILTER (WHERE m.tracked))[1] AS model_id
            FROM pg_temp.sessiontag_spans s
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

-- Ends the stored running spans that the staged finished spans end (from earlier calls or
-- earlier in the batch); returns how many. An end before the stored start breaks
-- llm_traces' CHECK (end_time >= start_time), and the caller's diagnosis names the row.
CREATE OR REPLACE FUNCTION sessiontag._ingest_complete()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    completed integer;
BEGIN
    WITH ended AS (
        UPDATE sessiontag.llm_traces t
        SET status = f.status,
            end_time = f.end_time,
            output_data = coalesce(f.output_data, t.output_data),
            input_tokens = coalesce(f.input_tokens, t.input_tokens),
            output_tokens = coalesce(f.output_tokens, t.output_tokens),
            cost_usd = coalesce(f.cost_usd, t.cost_usd),
            error_message = coalesce(f.error_message, t.error_message)
        FROM (
            -- The first finished staged row of each span ends it.
            SELECT DISTINCT ON (s.user_id, s.trace_id, s.span_id)
                   s.user_id, s.trace_id, s.span_id, coalesce(s.status, 'success') AS status,
                   coalesce(s.end_time, now()) AS end_time, s.output_data, s.input_tokens, s.output_tokens,
                   s.cost_usd, s.error_message
            FROM pg_temp.sessiontag_spans s
            WHERE s.status IS DISTINCT FROM 'running'
            ORDER BY s.user_id, s.trace_id, s.span_id, s.ctid
        ) f
        WHERE t.user_id = f.user_id AND t.trace_id = f.trace_id AND t.span_id = f.span_id AND t.status = 'running'
        RETURNING 1)
    SELECT count(*) INTO completed FROM ended;
    RETURN completed;
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
CREATE OR REPLACE FUNCTION sessiontag.ingest_traces(spans jsonb)
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
    -- them. OFFSET 0 keeps these checks first, below the mover's.
    json_source CONSTANT text := $sql$(
        SELECT r.user_id, r.trace_id, r.span_id, r.span_name, r.operation_type, r.conversation_id,
               r.parent_span_id, r.model_id, r.model_name, r.model_provider, r.session_tag, r.input_data,
               r.metadata, r.start_time::timestamptz AS start_time, r.status, r.output_data, r.input_tokens,
               r.output_tokens, r.cost_usd, r.error_message, r.end_time::timestamptz AS end_time, r.message_id
        FROM ROWS FROM (
            jsonb_to_recordset($1) AS (
                user_id uuid, trace_id text, span_id text, span_name text, operation_type text,
                conversation_id uuid, parent_span_id text, model_id uuid, model_name text, model_provider text,
                session_tag text, input_data jsonb, metadata jsonb, start_time text, status text,
                output_data jsonb, input_tokens integer, output_tokens integer, cost_usd numeric,
                error_message text, end_time text, message_id text),
            jsonb_array_elements($1)) AS r
        CROSS JOIN LATERAL (SELECT r.value AS elem) AS e
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
              OR r.start_time !~ sessiontag._iso_time_pattern()
              OR r.end_time !~ sessiontag._iso_time_pattern()
              OR r.user_id <> $2
            THEN sessiontag._invalid_span()
            ELSE true
        END
        ) s$sql$;
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

-- The work of ingest_otlp (partial false: all or nothing, raising on the first bad span)
-- and of ingest_otlp_partial (partial true: the bad spans are refused, the others stored).
-- rejected: [{path, trace_id, span_id, field, problem, sqlstate}], in request order.
CREATE OR REPLACE FUNCTION sessiontag._otlp_ingest(payload jsonb, default_user_id uuid, partial boolean,
                                        OUT stored integer, OUT rejected jsonb)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
    bad record;
    flat jsonb;
    good jsonb;
    spans jsonb;
    problems jsonb;
    failed boolean;
    fresh_conversation record;
    err_state text;
    err_message text;
    idx integer;
BEGIN
    stored := 0;
    rejected := '[]';
    IF _otlp_ingest.payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed', COLUMN = 'payload';
    END IF;
    IF jsonb_typeof(_otlp_ingest.payload) <> 'object'
       OR coalesce(jsonb_typeof(_otlp_ingest.payload -> 'resourceSpans'), 'null') NOT IN ('array', 'null') THEN
        RAISE EXCEPTION 'payload must be an OTLP/JSON ExportTraceServiceRequest: an object whose resourceSpans, if any, is an array'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'payload';
    END IF;
    -- proto3 JSON: a repeated field left out (or null) is empty, so {} is a request of no
    -- spans (scopeSpans and spans below alike).
    IF coalesce(jsonb_typeof(_otlp_ingest.payload -> 'resourceSpans'), 'null') = 'null' THEN
        RETURN;
    END IF;
    -- The shape first, so a malformed request is named by its path, not by a cast deep inside.
    SELECT x.path, x.problem INTO bad FROM (
        SELECT format('payload.resourceSpans[%s].scopeSpans', r.i - 1) AS path, 'must be an array' AS problem, r.i, 0 AS s
        FROM jsonb_array_elements(_otlp_ingest.payload -> 'resourceSpans') WITH ORDINALITY AS r(rs, i)
        WHERE jsonb_typeof(r.rs) <> 'object' OR jsonb_typeof(coalesce(nullif(r.rs -> 'scopeSpans', 'null'), '[]')) <> 'array'
        UNION ALL
        SELECT format('payload.resourceSpans[%s].scopeSpans[%s].spans', r.i - 1, s.i - 1), 'must be an array', r.i, s.i
        FROM jsonb_array_elements(_otlp_ingest.payload -> 'resourceSpans') WITH ORDINALITY AS r(rs, i)
        CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(r.rs -> 'scopeSpans') = 'array'
                                                     THEN r.rs -> 'scopeSpans' ELSE '[]' END) WITH ORDINALITY AS s(ss, i)
        WHERE jsonb_typeof(s.ss) <> 'object' OR jsonb_typeof(coalesce(nullif(s.ss -> 'spans', 'null'), '[]')) <> 'array'
    ) x ORDER BY x.i, x.s LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%: %', bad.path, bad.problem USING ERRCODE = 'invalid_parameter_value', COLUMN = 'payload';
    END IF;

    -- Every span with its place, its attributes (the resource's, overridden by the
    -- span's), the attribute naming its user and its conversation (first present wins),
    -- and the first problem the request alone shows. Materialized, so that no row carries
    -- its whole resourceSpans element into the numbering's sort (it holds every span),
    -- and so that each use of attrs below does not convert the attributes again.
    WITH place AS MATERIALIZED (
        SELECT r.i AS ri, s.i AS si, p.i AS pi, p.span, s.ss -> 'scope' AS scope,
               sessiontag._otlp_attributes(r.rs -> 'resource' -> 'attributes') AS res,
               sessiontag._otlp_attributes(p.span -> 'attributes') AS own
        FROM jsonb_array_elements(_otlp_ingest.payload -> 'resourceSpans') WITH ORDINALITY AS r(rs, i)
        CROSS JOIN LATERAL jsonb_array_elements(coalesce(nullif(r.rs -> 'scopeSpans', 'null'), '[]')) WITH ORDINALITY AS s(ss, i)
        CROSS JOIN LATERAL jsonb_array_elements(coalesce(nullif(s.ss -> 'spans', 'null'), '[]')) WITH ORDINALITY AS p(span, i)
    ), raw AS (
        SELECT row_number() OVER (ORDER BY x.ri, x.si, x.pi) AS n,
               format('payload.resourceSpans[%s].scopeSpans[%s].spans[%s]', x.ri - 1, x.si - 1, x.pi - 1) AS path,
               x.span, x.scope, x.res, x.own
        FROM place x
    ), named AS MATERIALIZED (
        SELECT raw.*, a.attrs,
               CASE WHEN a.attrs ? 'user.id' THEN 'user.id'
                    WHEN a.attrs ? 'enduser.id' THEN 'enduser.id'
                    WHEN a.attrs ? 'langfuse.user.id' THEN 'langfuse.user.id'
                    WHEN a.attrs ? 'traceloop.association.properties.user_id'
                        THEN 'traceloop.association.properties.user_id' END AS user_key,
               coalesce(a.attrs ->> 'langfuse.session.id', a.attrs ->> 'session.id',
                        a.attrs ->> 'gen_ai.conversation.id', a.attrs ->> 'traceloop.association.properties.session_id',
                        a.attrs ->> 'langsmith.metadata.session_id') AS external_id
        FROM raw CROSS JOIN LATERAL (SELECT raw.res || raw.own AS attrs) a
    ), checked AS (
        SELECT nm.*, CASE
            WHEN jsonb_typeof(nm.span) <> 'object' THEN ROW('', 'must be a span object', '22023')::sessiontag._problem
            -- Ids as OTLP/JSON writes them: hex, 16 bytes for a trace, 8 for a span, never
            -- all zero (W3C trace context: an invalid id); an empty parentSpanId is a root.
            WHEN coalesce(nm.span ->> 'traceId', '') !~ '^[0-9a-fA-F]{32}$' OR nm.span ->> 'traceId' ~ '^0+$' THEN
                ROW('traceId', format('must be 32 hex digits, not all zero, got %s',
                                      left(coalesce((nm.span -> 'traceId')::text, 'none'), 80)), '22023')::sessiontag._problem
            WHEN coalesce(nm.span ->> 'spanId', '') !~ '^[0-9a-fA-F]{16}$' OR nm.span ->> 'spanId' ~ '^0+$' THEN
                ROW('spanId', format('must be 16 hex digits, not all zero, got %s',
                                     left(coalesce((nm.span -> 'spanId')::text, 'none'), 80)), '22023')::sessiontag._problem
            WHEN coalesce(nm.span ->> 'parentSpanId', '') <> ''
                 AND (nm.span ->> 'parentSpanId' !~ '^[0-9a-fA-F]{16}$' OR nm.span ->> 'parentSpanId' ~ '^0+$') THEN
                ROW('parentSpanId', format('must be 16 hex digits, not all zero, or empty for a root span, got %s',
                                           left((nm.span -> 'parentSpanId')::text, 80)), '22023')::sessiontag._problem
            WHEN nm.span ->> 'startTimeUnixNano' !~ '^[0-9]{0,19}$' THEN
                ROW('startTimeUnixNano', format('must be nanoseconds since the epoch, got %s',
                                                nm.span -> 'startTimeUnixNano'), '22023')::sessiontag._problem
            WHEN nm.span ->> 'endTimeUnixNano' !~ '^[0-9]{0,19}$' THEN
                ROW('endTimeUnixNano', format('must be nanoseconds since the epoch, got %s',
                                              nm.span -> 'endTimeUnixNano'), '22023')::sessiontag._problem
            WHEN nm.attrs ->> nm.user_key !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' THEN
                ROW(format('attributes[%s]', nm.user_key), format('%s is not a uuid', quote_literal(nm.attrs ->> nm.user_key)),
                    '22P02')::sessiontag._problem
            WHEN nm.user_key IS NULL AND _otlp_ingest.default_user_id IS NULL THEN
                ROW('', 'no user: give the attribute user.id (or enduser.id, langfuse.user.id,'
                        ' traceloop.association.properties.user_id), or default_user_id', '22004')::sessiontag._problem
            WHEN scoped IS NOT NULL
                 AND coalesce((nm.attrs ->> nm.user_key)::uuid, _otlp_ingest.default_user_id) <> scoped THEN
                ROW(coalesce(format('attributes[%s]', nm.user_key), ''),
                    format('user %s is not the user of this session (sessiontag.user_id)',
                           coalesce((nm.attrs ->> nm.user_key)::uuid, _otlp_ingest.default_user_id)),
                    '42501')::sessiontag._problem
        END AS p
        FROM named nm
    )
    SELECT jsonb_agg(jsonb_build_object(
               'n', c.n, 'path', c.path, 'span', c.span, 'scope', c.scope, 'res', c.res, 'own', c.own,
               'attrs', c.attrs, 'external_id', c.external_id,
               'trace_id', lower(c.span ->> 'traceId'), 'span_id', lower(c.span ->> 'spanId'),
               'user_id', CASE WHEN (c.p).field IS NULL
                               THEN coalesce((c.attrs ->> c.user_key)::uuid, _otlp_ingest.default_user_id) END,
               'field', (c.p).field, 'problem', (c.p).problem, 'sqlstate', (c.p).sqlstate)
           ORDER BY c.n)
    INTO flat
    FROM checked c;
    IF flat IS NULL THEN
        RETURN;
    END IF;

    SELECT coalesce(jsonb_agg(f.item ORDER BY f.n) FILTER (WHERE f.item ? 'field' AND f.item ->> 'field' IS NOT NULL), '[]'),
           coalesce(jsonb_agg(f.item ORDER BY f.n) FILTER (WHERE f.item ->> 'field' IS NULL), '[]')
    INTO rejected, good
    FROM jsonb_array_elements(flat) WITH ORDINALITY AS f(item, n);
    IF NOT _otlp_ingest.partial AND rejected <> '[]' THEN
        bad := NULL;
        SELECT rejected -> 0 ->> 'path' AS path, rejected -> 0 ->> 'field' AS field,
               rejected -> 0 ->> 'problem' AS problem, rejected -> 0 ->> 'sqlstate' AS sqlstate INTO bad;
        RAISE EXCEPTION USING
            MESSAGE = CASE WHEN bad.field = '' THEN bad.path || ': ' || bad.problem
                           ELSE bad.path || '.' || bad.field || ': ' || bad.problem END,
            ERRCODE = bad.sqlstate,
            COLUMN = CASE WHEN bad.sqlstate = '22004' THEN 'default_user_id' ELSE 'payload' END;
    END IF;

    -- Store the good spans. ingest_traces refuses a batch with a bad span: the partial
    -- form then refuses every span _element_problem finds bad (else the one the error
    -- names), undoes the conversations it created for the batch, and tries the rest.
    WHILE jsonb_array_length(good) > 0 LOOP
        failed := false;
        problems := NULL;
        BEGIN
            -- The conversation of each span: the one it names, else the one another span
            -- of its trace names in this request, else the one stored spans of its trace
            -- have; one per trace, even when only one span names it.
            WITH s AS (
                SELECT e.item, e.n, (e.item ->> 'user_id')::uuid AS user_id, e.item ->> 'trace_id' AS trace_id,
                       first_value(e.item ->> 'external_id') OVER (
                           PARTITION BY e.item ->> 'user_id', e.item ->> 'trace_id'
                           ORDER BY e.item ->> 'external_id' IS NULL, e.n) AS trace_external_id
                FROM jsonb_array_elements(good) WITH ORDINALITY AS e(item, n)
            ), unnamed AS (
                SELECT DISTINCT s.user_id, s.trace_id FROM s WHERE s.trace_external_id IS NULL
            ), known AS (
                SELECT DISTINCT ON (t.user_id, t.trace_id) t.user_id, t.trace_id, t.conversation_id
                FROM sessiontag.llm_traces t JOIN unnamed u ON u.user_id = t.user_id AND u.trace_id = t.trace_id
                WHERE t.conversation_id IS NOT NULL
                ORDER BY t.user_id, t.trace_id, t.start_time, t.id
            )
            SELECT jsonb_agg(s.item || jsonb_build_object(
                       'external_id', s.trace_external_id, 'known_conversation_id', k.conversation_id,
                       'model_id', coalesce(sessiontag.model_id(s.item -> 'attrs' ->> 'gen_ai.response.model', s.user_id),
                                            sessiontag.model_id(s.item -> 'attrs' ->> 'gen_ai.request.model', s.user_id)))
                   ORDER BY s.n)
            INTO spans
            FROM s LEFT JOIN known k ON k.user_id = s.user_id AND k.trace_id = s.trace_id;

            -- Conversations seen for the first time, with the model of their earliest
            -- span. One of a tracked model is inserted untagged and then tagged by
            -- ensure_session_tag, under its row lock: a concurrent export that inserts the
            -- same conversation waits for this one and skips its row, and as it took no
            -- number for it, no number is lost.
            FOR fresh_conversation IN
                WITH named AS (
                    SELECT DISTINCT ON (1, 2) (e.f ->> 'user_id')::uuid AS user_id, e.f ->> 'external_id' AS external_id,
                           (e.f ->> 'model_id')::uuid AS model_id
                    FROM jsonb_array_elements(spans) AS e(f)
                    WHERE e.f ->> 'external_id' IS NOT NULL
                    ORDER BY 1, 2, e.f ->> 'model_id' IS NULL, sessiontag._otlp_time(e.f -> 'span' -> 'startTimeUnixNano')
                ), fresh AS (
                    SELECT n.* FROM named n
                    LEFT JOIN sessiontag.conversations v ON v.user_id = n.user_id AND v.external_id = n.external_id
                    WHERE v.id IS NULL
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
                       'trace_id', o.f -> 'trace_id',
                       'span_id', o.f -> 'span_id',
                       'parent_span_id', nullif(lower(o.f -> 'span' ->> 'parentSpanId'), ''),
                       'span_name', o.f -> 'span' ->> 'name',
                       'operation_type', CASE
                           WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' IN ('chat', 'text_completion', 'generate_content')
                               THEN 'llm_call'
                           WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' = 'execute_tool' THEN 'tool'
                           WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' = 'embeddings' THEN 'embedding'
                           WHEN o.f -> 'attrs' ->> 'gen_ai.operation.name' IS NOT NULL
                               THEN o.f -> 'attrs' ->> 'gen_ai.operation.name'
                           WHEN o.f -> 'attrs' ? 'gen_ai.request.model' OR o.f -> 'attrs' ? 'gen_ai.response.model'
                               THEN 'llm_call'
                           ELSE 'internal' END,
                       'conversation_id', coalesce(v.id::text, o.f ->> 'known_conversation_id'),
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
                       'input_data', CASE WHEN o.f -> 'attrs' ? 'gen_ai.input.messages'
                                          THEN sessiontag._otlp_json(o.f -> 'attrs' -> 'gen_ai.input.messages') END,
                       'output_data', CASE WHEN o.f -> 'attrs' ? 'gen_ai.output.messages'
                                           THEN sessiontag._otlp_json(o.f -> 'attrs' -> 'gen_ai.output.messages') END,
                       -- The span's own attributes (less the messages, kept as input and
                       -- output), its resource's and scope; cache and reasoning token counts.
                       'metadata', jsonb_strip_nulls(jsonb_build_object(
                           'otel', jsonb_build_object(
                               'attributes', (o.f -> 'own') - 'gen_ai.input.messages' - 'gen_ai.output.messages',
                               'kind', o.f -> 'span' -> 'kind',
                               'resource', o.f -> 'res',
                               'scope', o.f -> 'scope'),
                           'usage', nullif(jsonb_strip_nulls(jsonb_build_object(
                               'cache_read.input_tokens',
                               coalesce(o.f -> 'attrs' -> 'gen_ai.usage.cache_read.input_tokens',
                                        o.f -> 'attrs' -> 'gen_ai.usage.cache_read_input_tokens'),
                               'cache_creation.input_tokens',
                               coalesce(o.f -> 'attrs' -> 'gen_ai.usage.cache_creation.input_tokens',
                                        o.f -> 'attrs' -> 'gen_ai.usage.cache_creation_input_tokens'),
                               'reasoning.output_tokens',
                               coalesce(o.f -> 'attrs' -> 'gen_ai.usage.reasoning.output_tokens',
                                        o.f -> 'attrs' -> 'gen_ai.usage.reasoning_tokens'))), '{}')))
                   ) ORDER BY o.n)
            INTO spans
            FROM jsonb_array_elements(spans) WITH ORDINALITY AS o(f, n)
            LEFT JOIN sessiontag.conversations v ON v.user_id = (o.f ->> 'user_id')::uuid
                                                AND v.external_id = o.f ->> 'external_id';

            BEGIN
                stored := sessiontag.ingest_traces(spans);
                PERFORM sessiontag._otlp_link_traces(links)
                FROM (SELECT jsonb_agg(DISTINCT jsonb_build_object('user_id', e.item -> 'user_id', 'trace_id',
                                                                   e.item -> 'trace_id', 'conversation_id',
                                                                   e.item -> 'conversation_id')) AS links
                      FROM jsonb_array_elements(spans) AS e(item)
                      WHERE e.item ->> 'conversation_id' IS NOT NULL) l
                WHERE l.links IS NOT NULL;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
                idx := substring(err_message FROM '^spans\[(\d+)\]')::integer;
                IF _otlp_ingest.partial AND (left(err_state, 2) IN ('22', '23') OR err_state IN ('P0002', '42501')) THEN
                    problems := sessiontag._otlp_problems(spans);
                    IF problems = '[]' AND idx IS NOT NULL THEN
                        problems := jsonb_build_array(jsonb_build_object(
                            'idx', idx, 'field', '', 'problem', substring(err_message FROM '^spans\[\d+\][.:] ?(.*)$'),
                            'sqlstate', err_state));
                    END IF;
                END IF;
                IF problems IS NULL OR problems = '[]' THEN
                    -- ingest_traces names spans[i].field; say which OTLP span that was.
                    IF idx IS NOT NULL THEN
                        err_message := (good -> idx ->> 'path') || substring(err_message FROM '^spans\[\d+\](.*)$');
                    END IF;
                    RAISE EXCEPTION USING MESSAGE = err_message, ERRCODE = err_state;
                END IF;
                failed := true;
                -- Undo this attempt's conversations too (the outer handler below).
                RAISE EXCEPTION 'retry without the refused spans';
            END;
        EXCEPTION WHEN OTHERS THEN
            IF NOT failed THEN
                RAISE;
            END IF;
        END;
        EXIT WHEN NOT failed;
        SELECT rejected || coalesce(jsonb_agg(good -> (p.item ->> 'idx')::integer || jsonb_build_object(
                   'field', p.item ->> 'field', 'problem', p.item ->> 'problem', 'sqlstate', p.item ->> 'sqlstate')
                   ORDER BY (p.item ->> 'idx')::integer), '[]')
        INTO rejected
        FROM jsonb_array_elements(problems) AS p(item);
        SELECT coalesce(jsonb_agg(g.item ORDER BY g.i), '[]') INTO good
        FROM jsonb_array_elements(good) WITH ORDINALITY AS g(item, i)
        WHERE NOT EXISTS (SELECT FROM jsonb_array_elements(problems) AS p(item)
                          WHERE (p.item ->> 'idx')::integer = g.i - 1);
    END LOOP;

    -- Only what a caller needs to name each refused span, in request order.
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'path', r.item -> 'path', 'trace_id', r.item -> 'trace_id', 'span_id', r.item -> 'span_id',
               'field', r.item -> 'field', 'problem', r.item -> 'problem', 'sqlstate', r.item -> 'sqlstate')
               ORDER BY (r.item ->> 'n')::bigint), '[]')
    INTO rejected
    FROM jsonb_array_elements(rejected) AS r(item);
END
$$;

-- Spans, newest first, with every filter optional. `search` is a literal,
-- case-insensitive substring of the tag, trace id, span name or model name: % and _
-- match only themselves. The query is built from the filters actually given, so the
-- planner picks the index that serves them.
CREATE OR REPLACE FUNCTION sessiontag.list_traces(
    user_id uuid DEFAULT NULL,
    session_tag text DEFAULT NULL,
    conversation_id uuid DEFAULT NULL,
    trace_id text DEFAULT NULL,
    model_name text DEFAULT NULL,
    status text DEFAULT NULL,
    operation_type text DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    search text DEFAULT NULL,
    roots_only boolean DEFAULT false,
    after text DEFAULT NULL,
    page_size integer DEFAULT 50
)
RETURNS SETOF sessiontag.trace_listing
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    size integer := sessiontag._check_page_size(list_traces.page_size);
    after_at timestamptz;
    after_user uuid;
    after_id uuid;
    q text := 'SELECT t.id, t.user_id, t.session_tag, t.trace_id, t.span_id, t.parent_span_id, t.conversation_id,'
              ' t.message_id, t.span_name, t.operation_type, t.model_id, t.model_name, t.model_provider, t.status,'
              ' t.start_time, t.end_time, t.duration_ms, t.input_tokens, t.output_tokens, t.cost_usd::numeric,'
              ' t.error_message, t.input_data, t.output_data, t.metadata, t.created_at,'
              ' sessiontag._encode_cursor(t.start_time, t.user_id, t.id)'
              ' FROM sessiontag.llm_traces t WHERE true';
BEGIN
    IF list_traces.status IS NOT NULL AND list_traces.status NOT IN ('running', 'success', 'error', 'cancelled') THEN
        RAISE EXCEPTION 'status must be one of running, success, error, cancelled; got %', list_traces.status
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM sessiontag._check_range(list_traces.since, list_traces.until);
    IF list_traces.search = '' THEN
        RAISE EXCEPTION 'search must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF list_traces.after IS NOT NULL THEN
        SELECT d.at, d.user_id, d.id INTO after_at, after_user, after_id
        FROM sessiontag._decode_cursor(list_traces.after, 'after') d;
        q := q || ' AND (t.start_time, t.user_id, t.id) < ($12, $13, $14)';
    END IF;
    IF list_traces.user_id IS NOT NULL THEN q := q || ' AND t.user_id = $1'; END IF;
    IF list_traces.session_tag IS NOT NULL THEN q := q || ' AND t.session_tag = $2'; END IF;
    IF list_traces.conversation_id IS NOT NULL THEN q := q || ' AND t.conversation_id = $3'; END IF;
    IF list_traces.trace_id IS NOT NULL THEN q := q || ' AND t.trace_id = $4'; END IF;
    IF list_traces.model_name IS NOT NULL THEN q := q || ' AND t.model_name = $5'; END IF;
    IF list_traces.status IS NOT NULL THEN q := q || ' AND t.status = $6'; END IF;
    IF list_traces.operation_type IS NOT NULL THEN q := q || ' AND t.operation_type = $7'; END IF;
    IF list_traces.since IS NOT NULL THEN q := q || ' AND t.start_time >= $8'; END IF;
    IF list_traces.until IS NOT NULL THEN q := q || ' AND t.start_time < $9'; END IF;
    IF list_traces.search IS NOT NULL THEN
        q := q || ' AND (strpos(lower(t.session_tag), $10) > 0 OR strpos(lower(t.trace_id), $10) > 0'
                  ' OR strpos(lower(t.span_name), $10) > 0 OR strpos(lower(t.model_name), $10) > 0)';
    END IF;
    IF list_traces.roots_only THEN q := q || ' AND t.parent_span_id IS NULL'; END IF;
    q := q || ' ORDER BY t.start_time DESC, t.user_id DESC, t.id DESC LIMIT $11';
    RETURN QUERY EXECUTE q USING list_traces.user_id, list_traces.session_tag, list_traces.conversation_id,
        list_traces.trace_id, list_traces.model_name, list_traces.status, list_traces.operation_type,
        list_traces.since, list_traces.until, lower(list_traces.search), size, after_at, after_user, after_id;
END
$$;

-- Every span of one trace, parents before children (siblings by start time), with depth
-- (0 for roots). A span whose parent is not recorded counts as a root; spans whose
-- parents form a cycle come last, each as a root, so no span is ever left out.
CREATE OR REPLACE FUNCTION sessiontag.get_trace(user_id uuid, trace_id text)
RETURNS SETOF sessiontag.trace_span
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF get_trace.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF get_trace.trace_id IS NULL THEN
        RAISE EXCEPTION 'trace_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY
    WITH RECURSIVE spans AS (
        SELECT s.* FROM sessiontag.llm_traces s
        WHERE s.user_id = get_trace.user_id AND s.trace_id = get_trace.trace_id
    ), tree AS (
        SELECT s.span_id, 0 AS depth,
               ARRAY[to_char(s.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || s.span_id] AS path
        FROM spans s
        WHERE s.parent_span_id IS NULL
           OR NOT EXISTS (SELECT FROM spans p WHERE p.span_id = s.parent_span_id)
        UNION ALL
        SELECT s.span_id, tree.depth + 1,
               tree.path || (to_char(s.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || s.span_id)
        FROM spans s
        JOIN tree ON s.parent_span_id = tree.span_id
        WHERE tree.depth < 1000
    ), placed AS (
        SELECT tree.span_id, tree.depth, tree.path FROM tree
        UNION ALL
        -- Spans no root reaches (their parents form a cycle): shown last, as roots.
        SELECT s.span_id, 0, ARRAY['~' || to_char(s.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || s.span_id]
        FROM spans s
        WHERE NOT EXISTS (SELECT FROM tree WHERE tree.span_id = s.span_id)
    )
    SELECT s.id, s.user_id, s.session_tag, s.trace_id, s.span_id, s.parent_span_id, s.conversation_id,
           s.message_id, s.span_name, s.operation_type, s.model_id, s.model_name, s.model_provider, s.status,
           s.start_time, s.end_time, s.duration_ms, s.input_tokens, s.output_tokens, s.cost_usd::numeric,
           s.error_message, s.input_data, s.output_data, s.metadata, s.created_at, placed.depth
    FROM placed JOIN spans s ON s.span_id = placed.span_id
    ORDER BY placed.path;
END
$$;

-- Tagged conversations, newest first, with their metrics.
CREATE OR REPLACE FUNCTION sessiontag.list_sessions(
    user_id uuid DEFAULT NULL,
    model_id uuid DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    after text DEFAULT NULL,
    page_size integer DEFAULT 50
)
RETURNS SETOF sessiontag.session_summary
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    size integer := sessiontag._check_page_size(list_sessions.page_size);
    after_at timestamptz;
    after_user uuid;
    after_id uuid;
    user_ids uuid[];
    ids uuid[];
    q text := 'SELECT array_agg(p.user_id ORDER BY p.created_at DESC, p.user_id DESC, p.id DESC),'
              ' array_agg(p.id ORDER BY p.created_at DESC, p.user_id DESC, p.id DESC)'
              ' FROM (SELECT v.user_id, v.id, v.created_at FROM sessiontag.conversations v'
              ' WHERE v.session_id IS NOT NULL';
BEGIN
    PERFORM sessiontag._check_range(list_sessions.since, list_sessions.until);
    IF list_sessions.after IS NOT NULL THEN
        SELECT d.at, d.user_id, d.id INTO after_at, after_user, after_id
        FROM sessiontag._decode_cursor(list_sessions.after, 'after') d;
        q := q || ' AND (v.created_at, v.user_id, v.id) < ($6, $7, $8)';
    END IF;
    IF list_sessions.user_id IS NOT NULL THEN q := q || ' AND v.user_id = $1'; END IF;
    IF list_sessions.model_id IS NOT NULL THEN q := q || ' AND v.llm_model_id = $2'; END IF;
    IF list_sessions.since IS NOT NULL THEN q := q || ' AND v.created_at >= $3'; END IF;
    IF list_sessions.until IS NOT NULL THEN q := q || ' AND v.created_at < $4'; END IF;
    q := q || ' ORDER BY v.created_at DESC, v.user_id DESC, v.id DESC LIMIT $5) p';
    EXECUTE q INTO user_ids, ids USING list_sessions.user_id, list_sessions.model_id, list_sessions.since,
        list_sessions.until, size, after_at, after_user, after_id;
    RETURN QUERY SELECT * FROM sessiontag._summarize(user_ids, ids);
END
$$;

-- The list_sessions row of one session. Each user numbers their own sessions, so
-- several users may hold the same tag: without user_id there is one row per such user.
CREATE OR REPLACE FUNCTION sessiontag.session_summary(session_id text, user_id uuid DEFAULT NULL)
RETURNS SETOF sessiontag.session_summary
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    user_ids uuid[];
    ids uuid[];
BEGIN
    IF session_summary.session_id IS NULL THEN
        RAISE EXCEPTION 'session_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT array_agg(v.user_id ORDER BY v.created_at, v.user_id), array_agg(v.id ORDER BY v.created_at, v.user_id)
    INTO user_ids, ids
    FROM sessiontag.conversations v
    WHERE v.session_id = session_summary.session_id
      AND (session_summary.user_id IS NULL OR v.user_id = session_summary.user_id);
    RETURN QUERY SELECT * FROM sessiontag._summarize(user_ids, ids);
END
$$;

-- Models side by side over their tagged sessions (created in [since, until)): sessions,
-- traces, the share of traces with an error span, llm_call latency, usage and cost.
CREATE OR REPLACE FUNCTION sessiontag.compare_models(
    user_id uuid DEFAULT NULL,
    model_ids uuid[] DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL
)
RETURNS TABLE (
    model_id uuid, model_name text, provider text, sessions bigint, traces bigint, error_rate double precision,
    p50_ms double precision, p95_ms double precision, input_tokens bigint, output_tokens bigint,
    cost_usd numeric, cost_per_session numeric
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM sessiontag._check_range(compare_models.since, compare_models.until);
    RETURN QUERY
    WITH s AS (
        SELECT v.user_id, v.session_id, v.llm_model_id
        FROM sessiontag.conversations v
        WHERE v.session_id IS NOT NULL AND v.llm_model_id IS NOT NULL
          AND (compare_models.user_id IS NULL OR v.user_id = compare_models.user_id)
          AND (compare_models.model_ids IS NULL OR v.llm_model_id = ANY (compare_models.model_ids))
          AND (compare_models.since IS NULL OR v.created_at >= compare_models.since)
          AND (compare_models.until IS NULL OR v.created_at < compare_models.until)
    ), spans AS (
        SELECT s.llm_model_id, t.user_id, t.trace_id, t.status, t.operation_type, t.duration_ms,
               t.input_tokens, t.output_tokens, t.cost_usd
        FROM s JOIN sessiontag.llm_traces t ON t.user_id = s.user_id AND t.session_tag = s.session_id
    ), per_model AS (
        SELECT sp.llm_model_id,
               count(DISTINCT (sp.user_id, sp.trace_id)) AS traces,
               count(DISTINCT (sp.user_id, sp.trace_id)) FILTER (WHERE sp.status = 'error') AS failed,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY sp.duration_ms) FILTER (WHERE sp.operation_type = 'llm_call') AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY sp.duration_ms) FILTER (WHERE sp.operation_type = 'llm_call') AS p95,
               coalesce(sum(sp.input_tokens), 0) AS input_tokens,
               coalesce(sum(sp.output_tokens), 0) AS output_tokens,
               coalesce(sum(sp.cost_usd), 0) AS cost
        FROM spans sp GROUP BY sp.llm_model_id
    ), per_model_sessions AS (
        SELECT s.llm_model_id, count(*) AS sessions FROM s GROUP BY s.llm_model_id
    )
    SELECT m.id, m.name, m.provider, ms.sessions, coalesce(pm.traces, 0),
           CASE WHEN coalesce(pm.traces, 0) = 0 THEN NULL ELSE pm.failed::double precision / pm.traces END,
           pm.p50, pm.p95, coalesce(pm.input_tokens, 0)::bigint, coalesce(pm.output_tokens, 0)::bigint,
           coalesce(pm.cost, 0)::numeric, round(coalesce(pm.cost, 0) / ms.sessions, 8)::numeric
    FROM per_model_sessions ms
    JOIN sessiontag.llm_models m ON m.id = ms.llm_model_id
    LEFT JOIN per_model pm ON pm.llm_model_id = ms.llm_model_id
    ORDER BY m.name, m.id;
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
CREATE OR REPLACE FUNCTION sessiontag._check_user(user_id uuid DEFAULT NULL)
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
                  HINT = 'Run SELECT set_config(''sessiontag.user_id'', <user uuid>, true) in the transaction first.';
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

-- Feedback, newest first (by when it was first recorded), every filter optional; keyset
-- pagination as in list_traces.
CREATE OR REPLACE FUNCTION sessiontag.list_feedback(
    user_id uuid DEFAULT NULL,
    conversation_id uuid DEFAULT NULL,
    session_id text DEFAULT NULL,
    trace_id text DEFAULT NULL,
    name text DEFAULT NULL,
    after text DEFAULT NULL,
    page_size integer DEFAULT 50
)
RETURNS SETOF sessiontag.feedback_listing
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    size integer := sessiontag._check_page_size(list_feedback.page_size);
    after_at timestamptz;
    after_user uuid;
    after_id uuid;
BEGIN
    IF list_feedback.after IS NOT NULL THEN
        SELECT d.at, d.user_id, d.id INTO after_at, after_user, after_id
        FROM sessiontag._decode_cursor(list_feedback.after, 'after') d;
    END IF;
    RETURN QUERY
    SELECT f.id, f.user_id, c.session_id, f.conversation_id, f.trace_id, f.span_id, f.name, f.value, f.label,
           f.comment, f.source, f.created_at, f.updated_at, sessiontag._encode_cursor(f.created_at, f.user_id, f.id)
    FROM sessiontag.feedback f
    LEFT JOIN sessiontag.conversations c ON c.user_id = f.user_id AND c.id = f.conversation_id
    WHERE (list_feedback.user_id IS NULL OR f.user_id = list_feedback.user_id)
      AND (list_feedback.conversation_id IS NULL OR f.conversation_id = list_feedback.conversation_id)
      AND (list_feedback.session_id IS NULL OR c.session_id = list_feedback.session_id)
      AND (list_feedback.trace_id IS NULL OR f.trace_id = list_feedback.trace_id)
      AND (list_feedback.name IS NULL OR f.name = list_feedback.name)
      AND (after_at IS NULL OR (f.created_at, f.user_id, f.id) < (after_at, after_user, after_id))
    ORDER BY f.created_at DESC, f.user_id DESC, f.id DESC
    LIMIT size;
END
$$;

-- Per model and metric over tagged sessions created in [since, until): the value with its
-- interval and, with a baseline, the difference model - baseline with its interval and a
-- verdict. Metrics (each session counts once):
--   error_rate        share of sessions with an error span; Wilson, Newcombe
--   latency_ms        median over sessions of each session's median llm_call duration;
--                     order statistics, Price–Bonett
--   cost_per_session  mean of each session's total cost; t, Welch
--   feedback          (with feedback_name) mean over the sessions that have a value of
--                     each session's mean value of that name; t, Welch
-- The baseline is compared even when model_ids leaves it out.
CREATE OR REPLACE FUNCTION sessiontag.compare_metrics(
    user_id uuid DEFAULT NULL,
    model_ids uuid[] DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    baseline_model_id uuid DEFAULT NULL,
    feedback_name text DEFAULT NULL,
    confidence numeric DEFAULT 0.95
)
RETURNS TABLE (
    model_id uuid, model_name text, metric text, sessions bigint, value double precision, low double precision,
    high double precision, diff double precision, diff_low double precision, diff_high double precision,
    verdict text
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    conf double precision := compare_metrics.confidence;
BEGIN
    PERFORM sessiontag._check_range(compare_metrics.since, compare_metrics.until);
    IF conf IS NULL OR NOT (conf > 0 AND conf < 1) THEN
        RAISE EXCEPTION 'confidence must be between 0 and 1 (exclusive), got %',
            coalesce(compare_metrics.confidence::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'confidence';
    END IF;
    IF compare_metrics.feedback_name = '' THEN
        RAISE EXCEPTION 'feedback_name must not be empty' USING ERRCODE = 'invalid_parameter_value',
            COLUMN = 'feedback_name';
    END IF;
    IF compare_metrics.baseline_model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = compare_metrics.baseline_model_id) THEN
        RAISE EXCEPTION 'baseline_model_id % is not a registered model', compare_metrics.baseline_model_id
            USING ERRCODE = 'no_data_found', COLUMN = 'baseline_model_id';
    END IF;
    RETURN QUERY
    WITH s AS (
        SELECT v.user_id, v.id, v.session_id, v.llm_model_id
        FROM sessiontag.conversations v
        WHERE v.session_id IS NOT NULL AND v.llm_model_id IS NOT NULL
          AND (compare_metrics.user_id IS NULL OR v.user_id = compare_metrics.user_id)
          AND (compare_metrics.model_ids IS NULL OR v.llm_model_id = ANY (compare_metrics.model_ids)
               OR v.llm_model_id = compare_metrics.baseline_model_id)
          AND (compare_metrics.since IS NULL OR v.created_at >= compare_metrics.since)
          AND (compare_metrics.until IS NULL OR v.created_at < compare_metrics.until)
    ), per_session AS (
        SELECT s.llm_model_id,
               coalesce(bool_or(t.status = 'error'), false) AS failed,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_ms)
                   FILTER (WHERE t.operation_type = 'llm_call' AND t.duration_ms IS NOT NULL) AS latency,
               coalesce(sum(t.cost_usd), 0)::double precision AS cost
        FROM s LEFT JOIN sessiontag.llm_traces t ON t.user_id = s.user_id AND t.session_tag = s.session_id
        GROUP BY s.user_id, s.id, s.llm_model_id
    ), per_model AS (
        SELECT ps.llm_model_id,
               count(*) AS n,
               count(*) FILTER (WHERE ps.failed) AS failed,
               avg(ps.cost) AS cost_mean,
               var_samp(ps.cost) AS cost_var,
               count(ps.latency) AS n_latency,
               array_agg(ps.latency ORDER BY ps.latency) FILTER (WHERE ps.latency IS NOT NULL) AS latencies
        FROM per_session ps GROUP BY ps.llm_model_id
    ), scores AS (  -- each session's mean value of feedback_name
        SELECT s.llm_model_id, avg(f.value) AS score
        FROM s JOIN sessiontag.feedback f ON f.user_id = s.user_id AND f.conversation_id = s.id
        WHERE compare_metrics.feedback_name IS NOT NULL AND f.name = compare_metrics.feedback_name
          AND f.value IS NOT NULL
        GROUP BY s.user_id, s.id, s.llm_model_id
    ), per_model_scores AS (
        SELECT sc.llm_model_id, count(*) AS n, sessiontag._float(avg(sc.score)) AS mean,
               sessiontag._float(var_samp(sc.score)) AS var  -- numeric: values near 1e308 do not overflow
        FROM scores sc GROUP BY sc.llm_model_id
    ), models AS (  -- every model with sessions, and the baseline even without
        SELECT m.id, m.name, coalesce(m.id = compare_metrics.baseline_model_id, false) AS is_baseline,
               coalesce(pm.n, 0) AS n, coalesce(pm.failed, 0) AS failed, pm.cost_mean, pm.cost_var,
               coalesce(pm.n_latency, 0) AS n_latency, pm.latencies,
               coalesce(pf.n, 0) AS n_scores, pf.mean AS score_mean, pf.var AS score_var
        FROM sessiontag.llm_models m
        LEFT JOIN per_model pm ON pm.llm_model_id = m.id
        LEFT JOIN per_model_scores pf ON pf.llm_model_id = m.id
        WHERE pm.llm_model_id IS NOT NULL OR m.id = compare_metrics.baseline_model_id
    ), pairs AS (  -- each model with the baseline's figures (NULL without a baseline)
        SELECT m.*, b.n AS b_n, b.failed AS b_failed, b.cost_mean AS b_cost_mean, b.cost_var AS b_cost_var,
               b.n_latency AS b_n_latency, b.latencies AS b_latencies, b.n_scores AS b_n_scores,
               b.score_mean AS b_score_mean, b.score_var AS b_score_var,
               b.id IS NOT NULL AND NOT m.is_baseline AS compared
        FROM models m LEFT JOIN models b ON b.is_baseline
    ), metric_rows AS (
        SELECT 1 AS ord, p.id, p.name, p.is_baseline, 'error_rate' AS metric, p.n,
               CASE WHEN p.n > 0 THEN p.failed::double precision / p.n END AS v, w.low, w.high,
               d.diff, d.low AS dlow, d.high AS dhigh, false AS higher_is_better, p.b_n, p.compared
        FROM pairs p
        LEFT JOIN LATERAL sessiontag._wilson(p.failed, p.n, conf) w ON true
        LEFT JOIN LATERAL sessiontag._newcombe(p.failed, p.n, p.b_failed, p.b_n, conf) d ON p.compared
        UNION ALL
        SELECT 2, p.id, p.name, p.is_baseline, 'latency_ms', p.n_latency, mi.median, mi.low, mi.high,
               d.diff, d.low, d.high, false, p.b_n_latency, p.compared
        FROM pairs p
        LEFT JOIN LATERAL sessiontag._median_interval(p.latencies, conf) mi ON true
        LEFT JOIN LATERAL sessiontag._median_diff(p.latencies, p.b_latencies, conf) d
            ON p.compared AND p.n_latency >= 2 AND p.b_n_latency >= 2
        UNION ALL
        SELECT 3, p.id, p.name, p.is_baseline, 'cost_per_session', p.n, p.cost_mean, ti.low, ti.high,
               d.diff, d.low, d.high, false, p.b_n, p.compared
        FROM pairs p
        LEFT JOIN LATERAL sessiontag._t_interval(p.cost_mean, p.cost_var, p.n, conf) ti ON true
        LEFT JOIN LATERAL sessiontag._welch(p.cost_mean, p.cost_var, p.n, p.b_cost_mean, p.b_cost_var, p.b_n, conf) d
            ON p.compared
        UNION ALL
        SELECT 4, p.id, p.name, p.is_baseline, 'feedback', p.n_scores, p.score_mean, ti.low, ti.high,
               d.diff, d.low, d.high, true, p.b_n_scores, p.compared
        FROM pairs p
        LEFT JOIN LATERAL sessiontag._t_interval(p.score_mean, p.score_var, p.n_scores, conf) ti ON true
        LEFT JOIN LATERAL sessiontag._welch(p.score_mean, p.score_var, p.n_scores, p.b_score_mean, p.b_score_var,
                                            p.b_n_scores, conf) d ON p.compared
        WHERE compare_metrics.feedback_name IS NOT NULL
    )
    SELECT r.id, r.name, r.metric, r.n, r.v, r.low, r.high,
           CASE WHEN r.compared THEN r.diff END, CASE WHEN r.compared THEN r.dlow END,
           CASE WHEN r.compared THEN r.dhigh END,
           CASE WHEN r.compared THEN sessiontag._verdict(r.dlow, r.dhigh, r.higher_is_better, r.n, r.b_n) END
    FROM metric_rows r
    ORDER BY r.ord, r.is_baseline DESC, r.name, r.id;
END
$$;

DROP TRIGGER _400_keep_traces ON sessiontag.conversations;
DROP FUNCTION sessiontag._conversations_keep_traces();
DROP FUNCTION sessiontag._written_by_this_transaction(xid);
DROP FUNCTION sessiontag._not_on_a_shard(text);

ALTER TABLE sessiontag.llm_traces DROP CONSTRAINT llm_traces_user_id_conversation_id_fkey;
ALTER TABLE sessiontag.llm_traces ADD CONSTRAINT llm_traces_user_id_conversation_id_fkey
    FOREIGN KEY (user_id, conversation_id) REFERENCES sessiontag.conversations (user_id, id)
        ON DELETE SET NULL (conversation_id);
