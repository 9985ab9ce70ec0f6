-- Undoes 0013_otlp_receiver: ingest_otlp and _otlp_attributes as 0009 left them.

DROP FUNCTION sessiontag.ingest_otlp_partial(jsonb, uuid);
REVOKE EXECUTE ON FUNCTION sessiontag._check_user(uuid) FROM sessiontag_app, sessiontag_user;

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

DROP FUNCTION sessiontag._otlp_ingest(jsonb, uuid, boolean);
DROP FUNCTION sessiontag._otlp_link_traces(jsonb);
DROP FUNCTION sessiontag._otlp_problems(jsonb);
DROP FUNCTION sessiontag._otlp_json(jsonb);
DROP FUNCTION sessiontag._otlp_value(jsonb);
