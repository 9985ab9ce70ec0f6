-- sessiontag: search and analytics.
--
-- Lists are newest first and paginated by keyset: each row carries an opaque cursor, and
-- passing the last row's cursor as `after` continues strictly after it. The order is
-- total (time, then user_id, then id), so ties on time never repeat or skip a row, and a
-- page deep in the list costs what the first page costs (no OFFSET).
--
-- Session metrics: trace_count counts distinct traces and error_count those with an
-- error span (compare_models' error_rate is the same share); tokens and cost add up every
-- span's own usage, wherever in the tree the LLM call sits; latency percentiles are over
-- the finished spans of operation_type 'llm_call' (the model's own latency).

-- Ordered scans for the lists: every user, one user, one session tag.
CREATE INDEX idx_llm_traces_start ON sessiontag.llm_traces (start_time, user_id, id);
CREATE INDEX idx_llm_traces_user_start ON sessiontag.llm_traces (user_id, start_time, id);
-- (idx_llm_traces_session_tag, in 10_tables.sql, serves the tag: session_tag, start_time, user_id, id)
CREATE INDEX idx_conversations_created ON sessiontag.conversations (created_at, user_id, id);
CREATE INDEX idx_conversations_user_created ON sessiontag.conversations (user_id, created_at, id);

-- An opaque keyset cursor for (time, user_id, id): base64url of their exact values.
CREATE FUNCTION sessiontag._encode_cursor(at timestamptz, user_id uuid, id uuid)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN rtrim(translate(encode(convert_to(
        concat_ws(',', (extract(epoch FROM _encode_cursor.at) * 1000000)::bigint, _encode_cursor.user_id, _encode_cursor.id),
        'UTF8'), 'base64'), E'+/\n', '-_'), '=');
END
$$;

-- The values behind a cursor; raises 22023 naming the argument when it is not one.
CREATE FUNCTION sessiontag._decode_cursor(cursor text, argument text, OUT at timestamptz, OUT user_id uuid, OUT id uuid)
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b64 text := translate(_decode_cursor.cursor, '-_', '+/');
    parts text[];
BEGIN
    b64 := b64 || repeat('=', (4 - length(b64) % 4) % 4);
    parts := string_to_array(convert_from(decode(b64, 'base64'), 'UTF8'), ',');
    at := 'epoch'::timestamptz + parts[1]::bigint * interval '1 microsecond';
    user_id := parts[2]::uuid;
    id := parts[3]::uuid;
    IF array_length(parts, 1) <> 3 OR at IS NULL OR user_id IS NULL OR id IS NULL THEN
        RAISE EXCEPTION 'not a cursor';
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION '% is not a cursor returned by this function', _decode_cursor.argument
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

CREATE FUNCTION sessiontag._check_page_size(page_size integer)
RETURNS integer
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF _check_page_size.page_size IS NULL OR _check_page_size.page_size NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'page_size must be between 1 and 1000, got %', coalesce(_check_page_size.page_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN _check_page_size.page_size;
END
$$;

-- Result rows: a span's columns plus the list's cursor, or plus its depth in the tree.
-- (Composite types rather than RETURNS TABLE, whose columns would clash with the
-- parameters named after the same columns.)
CREATE TYPE sessiontag.trace_listing AS (
    id uuid, user_id uuid, session_tag text, trace_id text, span_id text, parent_span_id text,
    conversation_id uuid, message_id text, span_name text, operation_type text, model_id uuid,
    model_name text, model_provider text, status text, start_time timestamptz, end_time timestamptz,
    duration_ms double precision, input_tokens integer, output_tokens integer, cost_usd numeric,
    error_message text, input_data jsonb, output_data jsonb, metadata jsonb, created_at timestamptz,
    cursor text
);

CREATE TYPE sessiontag.trace_span AS (
    id uuid, user_id uuid, session_tag text, trace_id text, span_id text, parent_span_id text,
    conversation_id uuid, message_id text, span_name text, operation_type text, model_id uuid,
    model_name text, model_provider text, status text, start_time timestamptz, end_time timestamptz,
    duration_ms double precision, input_tokens integer, output_tokens integer, cost_usd numeric,
    error_message text, input_data jsonb, output_data jsonb, metadata jsonb, created_at timestamptz,
    depth integer
);

CREATE FUNCTION sessiontag._check_range(since timestamptz, until timestamptz)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF _check_range.since > _check_range.until THEN
        RAISE EXCEPTION 'since (%) is after until (%)', _check_range.since, _check_range.until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Refuses to run a search function inside a query that Citus sends to every shard. A
-- caller's query that passes such a function a subquery over a distributed table, as in
-- list_traces(session_tag => (SELECT session_id FROM sessiontag.conversations ...)), is
-- run by Citus once per shard, each run seeing the subquery's value on that shard only
-- (NULL where the row is elsewhere): the rows would be wrong, without an error. Citus
-- names its own connections citus_internal. On plain PostgreSQL this is one comparison.
CREATE FUNCTION sessiontag._not_on_a_shard(function_name text)
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF starts_with(current_setting('application_name'), 'citus_internal') THEN
        RAISE EXCEPTION '% cannot run inside a query Citus sends to each shard; pass it values, not a subquery over sessiontag tables', _not_on_a_shard.function_name
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Run the subquery first (or in a MATERIALIZED CTE) and pass its result.';
    END IF;
END
$$;

-- Spans, newest first, with every filter optional. `search` is a literal,
-- case-insensitive substring of the tag, trace id, span name or model name: % and _
-- match only themselves. The query is built from the filters actually given, so the
-- planner picks the index that serves them.
CREATE FUNCTION sessiontag.list_traces(
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
    PERFORM sessiontag._not_on_a_shard('list_traces');
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
CREATE FUNCTION sessiontag.get_trace(user_id uuid, trace_id text)
RETURNS SETOF sessiontag.trace_span
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM sessiontag._not_on_a_shard('get_trace');
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

-- One session: the tagged conversation and the metrics of its traces.
CREATE TYPE sessiontag.session_summary AS (
    session_id      text,
    badge           text,
    user_id         uuid,
    conversation_id uuid,
    model_id        uuid,
    model_name      text,
    counter         bigint,
    trace_count     bigint,
    error_count     bigint,
    input_tokens    bigint,
    output_tokens   bigint,
    cost_usd        numeric,
    p50_ms          double precision,
    p95_ms          double precision,
    first_at        timestamptz,
    last_at         timestamptz,
    cursor          text,
    -- Feedback on the session, its traces and spans (see 70_feedback.sql): how many
    -- rows, and per name {"count": rows, "mean": mean value or null}. Last, so that
    -- readers of the earlier columns by position are unaffected.
    feedback_count  bigint,
    feedback        jsonb
);

-- The list_sessions rows of the conversations (user_ids[i], ids[i]), in that order: one
-- set-based query over the keys (no call per row), so that a page costs one pass.
CREATE FUNCTION sessiontag._summarize(user_ids uuid[], ids uuid[])
RETURNS SETOF sessiontag.session_summary
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT c.session_id, sessiontag._badge(c.experiment_name, c.session_id, c.session_counter),
           c.user_id, c.id, c.llm_model_id, c.experiment_name, c.session_counter,
           m.trace_count, m.error_count, m.input_tokens, m.output_tokens, m.cost_usd, m.p50_ms, m.p95_ms,
           coalesce(m.first_at, c.created_at), coalesce(m.last_at, c.created_at),
           sessiontag._encode_cursor(c.created_at, c.user_id, c.id),
           fb.feedback_count, fb.feedback
    FROM unnest(_summarize.user_ids, _summarize.ids) WITH ORDINALITY k(user_id, id, ord)
    JOIN sessiontag.conversations c ON c.user_id = k.user_id AND c.id = k.id
    CROSS JOIN LATERAL (
        SELECT count(DISTINCT t.trace_id) AS trace_count,
               count(DISTINCT t.trace_id) FILTER (WHERE t.status = 'error') AS error_count,
               coalesce(sum(t.input_tokens), 0) AS input_tokens,
               coalesce(sum(t.output_tokens), 0) AS output_tokens,
               coalesce(sum(t.cost_usd), 0)::numeric AS cost_usd,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_ms) FILTER (WHERE t.operation_type = 'llm_call')
                   AS p50_ms,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY t.duration_ms) FILTER (WHERE t.operation_type = 'llm_call')
                   AS p95_ms,
               min(t.start_time) AS first_at,
               max(coalesce(t.end_time, t.start_time)) AS last_at
        FROM sessiontag.llm_traces t
        WHERE t.user_id = c.user_id AND t.session_tag = c.session_id
    ) m
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(g.n), 0)::bigint AS feedback_count,
               coalesce(jsonb_object_agg(g.name, jsonb_build_object('count', g.n, 'mean', g.mean)), '{}') AS feedback
        FROM (SELECT f.name, count(*) AS n, sessiontag._float(avg(f.value)) AS mean
              FROM sessiontag.feedback f
              WHERE f.user_id = c.user_id AND f.conversation_id = c.id
              GROUP BY f.name) g
    ) fb
    ORDER BY k.ord;
END
$$;

-- Tagged conversations, newest first, with their metrics.
CREATE FUNCTION sessiontag.list_sessions(
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
    PERFORM sessiontag._not_on_a_shard('list_sessions');
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
CREATE FUNCTION sessiontag.session_summary(session_id text, user_id uuid DEFAULT NULL)
RETURNS SETOF sessiontag.session_summary
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    user_ids uuid[];
    ids uuid[];
BEGIN
    PERFORM sessiontag._not_on_a_shard('session_summary');
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
CREATE FUNCTION sessiontag.compare_models(
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
    PERFORM sessiontag._not_on_a_shard('compare_models');
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
