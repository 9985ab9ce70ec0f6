-- The OTLP receiver's SQL side. ingest_otlp_partial stores an OTLP/JSON request span by
-- span and returns the refused spans with their reasons (partial success); ingest_otlp
-- keeps its all-or-nothing contract on the same code. The mapping takes the user from
-- user.id, enduser.id, langfuse.user.id or traceloop.association.properties.user_id, the
-- conversation from langfuse.session.id, session.id, gen_ai.conversation.id,
-- traceloop.association.properties.session_id or langsmith.metadata.session_id (one per
-- trace, even when only one span names it), the model from gen_ai.response.model before
-- gen_ai.request.model, the messages as input_data and output_data, cache and reasoning
-- token counts into metadata.usage, and keeps the resource and scope with each span;
-- ids are stored lower-case. The bodies below replace the earlier ones.
-- depends: 0012_ab_testing

-- An OTLP AnyValue as plain JSON: arrays and key-value lists become JSON arrays and
-- objects, an intValue (a JSON string, as int64 is in OTLP/JSON) a number.
CREATE FUNCTION sessiontag._otlp_value(value jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(_otlp_value.value) IS DISTINCT FROM 'object' THEN
        RETURN _otlp_value.value;
    END IF;
    RETURN CASE
        WHEN _otlp_value.value ? 'stringValue' THEN _otlp_value.value -> 'stringValue'
        WHEN _otlp_value.value ? 'intValue' THEN to_jsonb((_otlp_value.value ->> 'intValue')::numeric)
        WHEN _otlp_value.value ? 'doubleValue' THEN _otlp_value.value -> 'doubleValue'
        WHEN _otlp_value.value ? 'boolValue' THEN _otlp_value.value -> 'boolValue'
        WHEN _otlp_value.value ? 'bytesValue' THEN _otlp_value.value -> 'bytesValue'
        WHEN _otlp_value.value ? 'arrayValue' THEN coalesce((
            SELECT jsonb_agg(sessiontag._otlp_value(v.item) ORDER BY v.i)
            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(_otlp_value.value -> 'arrayValue' -> 'values') = 'array'
                                           THEN _otlp_value.value -> 'arrayValue' -> 'values' ELSE '[]' END)
                 WITH ORDINALITY AS v(item, i)), '[]')
        WHEN _otlp_value.value ? 'kvlistValue' THEN coalesce((
            SELECT jsonb_object_agg(kv.item ->> 'key', sessiontag._otlp_value(kv.item -> 'value'))
            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(_otlp_value.value -> 'kvlistValue' -> 'values') = 'array'
                                           THEN _otlp_value.value -> 'kvlistValue' -> 'values' ELSE '[]' END) AS kv(item)
            WHERE kv.item ->> 'key' IS NOT NULL), '{}')
        ELSE _otlp_value.value END;
END
$$;

-- OTLP attributes ([{key, value: {stringValue | intValue | ...}}]) as one JSON object.
CREATE OR REPLACE FUNCTION sessiontag._otlp_attributes(attributes jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(_otlp_attributes.attributes) IS DISTINCT FROM 'array' THEN
        RETURN '{}'::jsonb;
    END IF;
    -- The scalar cases inline: a call per attribute would cost every span.
    RETURN coalesce((
        SELECT jsonb_object_agg(a ->> 'key', CASE
                   WHEN a -> 'value' ? 'stringValue' THEN a -> 'value' -> 'stringValue'
                   WHEN a -> 'value' ? 'intValue' THEN to_jsonb((a -> 'value' ->> 'intValue')::numeric)
                   WHEN a -> 'value' ? 'doubleValue' THEN a -> 'value' -> 'doubleValue'
                   WHEN a -> 'value' ? 'boolValue' THEN a -> 'value' -> 'boolValue'
                   ELSE sessiontag._otlp_value(a -> 'value') END)
        FROM jsonb_array_elements(_otlp_attributes.attributes) AS a
        WHERE a ->> 'key' IS NOT NULL), '{}'::jsonb);
END
$$;

-- A message attribute (gen_ai.input.messages, gen_ai.output.messages) as JSON: SDKs
-- that cannot set structured attributes send it as a JSON string, kept as text when
-- it is not JSON.
CREATE FUNCTION sessiontag._otlp_json(value jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(_otlp_json.value) IS DISTINCT FROM 'string'
       OR left(ltrim(_otlp_json.value #>> '{}'), 1) NOT IN ('[', '{') THEN
        RETURN _otlp_json.value;
    END IF;
    BEGIN
        RETURN (_otlp_json.value #>> '{}')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        RETURN _otlp_json.value;
    END;
END
$$;

-- Every problem of an ingest_traces batch, one per bad element ([{idx, field, problem,
-- sqlstate}], idx from 0), as _element_problem finds them: what ingest_otlp_partial
-- refuses after ingest_traces failed. Runs as the owner (the checks read stored spans),
-- so a user-scoped caller gets its own user's elements checked only.
CREATE FUNCTION sessiontag._otlp_problems(spans jsonb)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
    found jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(jsonb_build_object('idx', x.idx - 1, 'field', (x.p).field, 'problem', (x.p).problem,
                                                 'sqlstate', (x.p).sqlstate) ORDER BY x.idx), '[]')
    INTO found
    FROM (SELECT e.idx, CASE WHEN scoped IS NOT NULL AND e.elem ->> 'user_id' IS DISTINCT FROM scoped::text
                             THEN ROW('user_id', 'is not the user of this session (sessiontag.user_id)',
                                      '42501')::sessiontag._problem
                             ELSE sessiontag._element_problem(e.elem) END AS p
          FROM jsonb_array_elements(_otlp_problems.spans) WITH ORDINALITY AS e(elem, idx)) x
    WHERE (x.p).field IS NOT NULL;
    RETURN found;
END
$$;

-- Gives the stored spans of the traces in links ([{user_id, trace_id, conversation_id}])
-- that have no conversation yet the conversation a later span of their trace named (an
-- SDK exports a trace's children before the root that may name it), with its tag.
-- Returns how many. Runs as the owner (only its functions write tags); a user-scoped
-- caller links its own user's spans only.
CREATE FUNCTION sessiontag._otlp_link_traces(links jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
    linked integer;
BEGIN
    WITH l AS (
        SELECT DISTINCT (e.item ->> 'user_id')::uuid AS user_id, e.item ->> 'trace_id' AS trace_id,
               (e.item ->> 'conversation_id')::uuid AS conversation_id
        FROM jsonb_array_elements(_otlp_link_traces.links) AS e(item)
    ), done AS (
        UPDATE sessiontag.llm_traces t
        SET conversation_id = c.id, session_tag = c.session_id
        FROM l JOIN sessiontag.conversations c ON c.user_id = l.user_id AND c.id = l.conversation_id
        WHERE t.user_id = l.user_id AND t.trace_id = l.trace_id AND t.conversation_id IS NULL
          AND c.analytics_enabled AND (scoped IS NULL OR l.user_id = scoped)
        RETURNING 1
    )
    SELECT count(*) INTO linked FROM done;
    RETURN linked;
END
$$;

-- The work of ingest_otlp (partial false: all or nothing, raising on the first bad span)
-- and of ingest_otlp_partial (partial true: the bad spans are refused, the others stored).
-- rejected: [{path, trace_id, span_id, field, problem, sqlstate}], in request order.
CREATE FUNCTION sessiontag._otlp_ingest(payload jsonb, default_user_id uuid, partial boolean,
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

-- An OTLP/JSON ExportTraceServiceRequest, all or nothing; returns how many spans took
-- effect (a re-sent export stores nothing twice).
CREATE OR REPLACE FUNCTION sessiontag.ingest_otlp(payload jsonb, default_user_id uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
BEGIN
    RETURN (SELECT o.stored FROM sessiontag._otlp_ingest(ingest_otlp.payload, ingest_otlp.default_user_id, false) o);
END
$$;

-- An OTLP/JSON ExportTraceServiceRequest, span by span: stores the good spans and
-- returns how many took effect, and the refused ones ([{path, trace_id, span_id, field,
-- problem, sqlstate}]); what an OTLP receiver answers with partial_success. A malformed
-- request (not an ExportTraceServiceRequest) still raises, storing nothing.
CREATE FUNCTION sessiontag.ingest_otlp_partial(payload jsonb, default_user_id uuid DEFAULT NULL,
                                               OUT stored integer, OUT rejected jsonb)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
BEGIN
    SELECT o.stored, o.rejected INTO stored, rejected
    FROM sessiontag._otlp_ingest(ingest_otlp_partial.payload, ingest_otlp_partial.default_user_id, true) o;
END
$$;

REVOKE ALL ON FUNCTION sessiontag.ingest_otlp_partial(jsonb, uuid), sessiontag._otlp_ingest(jsonb, uuid, boolean),
    sessiontag._otlp_value(jsonb), sessiontag._otlp_json(jsonb), sessiontag._otlp_problems(jsonb),
    sessiontag._otlp_link_traces(jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    sessiontag.ingest_otlp_partial(jsonb, uuid),
    sessiontag._otlp_ingest(jsonb, uuid, boolean),
    sessiontag._otlp_value(jsonb),
    sessiontag._otlp_json(jsonb),
    sessiontag._otlp_problems(jsonb),
    sessiontag._otlp_link_traces(jsonb),
    sessiontag._check_user(uuid)
    TO sessiontag_app, sessiontag_user;
