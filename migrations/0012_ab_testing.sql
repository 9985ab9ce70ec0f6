-- A/B testing of models: feedback (scores and labels on a session, trace or span, one
-- per target, name and source), feedback counts and means in list_sessions and
-- session_summary (whose rows are now built set-based from the conversations' keys, with
-- no call per row), and compare_metrics: per model and metric, a value with its
-- confidence interval and, against a baseline, the difference with its interval and a
-- verdict. Feedback a rollback of this migration kept in sessiontag_archive comes back.
-- depends: 0011_bulk_ingest

CREATE TABLE sessiontag.feedback (
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id         uuid        NOT NULL,
    conversation_id uuid,
    trace_id        text        CHECK (trace_id <> '' AND length(trace_id) <= 128),
    span_id         text        CHECK (span_id <> '' AND length(span_id) <= 128),
    name            text        NOT NULL CHECK (name <> '' AND length(name) <= 200),
    value           numeric     CHECK (value NOT IN ('NaN', 'Infinity', '-Infinity')
                                       AND (value = 0 OR abs(value) BETWEEN 4.9406564584124654e-324
                                                                       AND 1.7976931348623157e308)),
    label           text        CHECK (label <> '' AND length(label) <= 200),
    comment         text        CHECK (length(comment) <= 10000),
    source          text        NOT NULL DEFAULT 'user' CHECK (source <> '' AND length(source) <= 100),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id),
    -- The target: a session (trace_id NULL), a trace (span_id NULL) or a span. A trace's
    -- or span's conversation is a function of the trace, so it does not widen the key.
    CONSTRAINT feedback_target_key UNIQUE NULLS NOT DISTINCT (user_id, conversation_id, trace_id, span_id, name, source),
    CONSTRAINT feedback_has_target CHECK (conversation_id IS NOT NULL OR trace_id IS NOT NULL),
    CONSTRAINT feedback_span_has_trace CHECK (span_id IS NULL OR trace_id IS NOT NULL),
    CONSTRAINT feedback_has_value_or_label CHECK (value IS NOT NULL OR label IS NOT NULL),
    FOREIGN KEY (user_id, conversation_id) REFERENCES sessiontag.conversations (user_id, id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, trace_id, span_id) REFERENCES sessiontag.llm_traces (user_id, trace_id, span_id)
        ON DELETE CASCADE
);
COMMENT ON TABLE sessiontag.feedback IS 'Scores and labels on a session, trace or span; one per (target, name, source)';
-- Deleting spans finds their feedback; list_feedback finds a trace's.
CREATE INDEX idx_feedback_trace ON sessiontag.feedback (user_id, trace_id, span_id) WHERE trace_id IS NOT NULL;
CREATE INDEX idx_feedback_user_created ON sessiontag.feedback (user_id, created_at, id);
CREATE INDEX idx_feedback_created ON sessiontag.feedback (created_at, user_id, id);

-- A numeric as a double precision that never fails: past the largest double it is
-- ±Infinity, below the smallest (in magnitude) 0. Feedback values are doubles (the table's
-- CHECK), but their means and variances need not be (a variance of values near 1e308 is
-- near 1e616), so the statistics of list_sessions, session_summary and compare_metrics
-- convert with it and no stored value can make them fail.
CREATE FUNCTION sessiontag._float(x numeric)
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN _float.x = 'NaN' THEN 'NaN'::double precision
                WHEN _float.x > 1.7976931348623157e308 THEN 'Infinity'::double precision
                WHEN _float.x < -1.7976931348623157e308 THEN '-Infinity'::double precision
                WHEN abs(_float.x) < 4.9406564584124654e-324 THEN 0::double precision
                ELSE _float.x::double precision END
$$;
REVOKE ALL ON FUNCTION sessiontag._float(numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sessiontag._float(numeric) TO sessiontag_app, sessiontag_user, sessiontag_reader;

-- Records a score and/or label on a session (conversation_id), a trace (trace_id) or a
-- span (trace_id and span_id) of user_id, and returns the row id. The same (target, name,
-- source) again replaces value, label and comment. SECURITY DEFINER, like record_trace:
-- it checks every reference, so no caller writes the table directly.
CREATE FUNCTION sessiontag.record_feedback(
    user_id uuid,
    name text,
    value numeric DEFAULT NULL,
    label text DEFAULT NULL,
    conversation_id uuid DEFAULT NULL,
    trace_id text DEFAULT NULL,
    span_id text DEFAULT NULL,
    comment text DEFAULT NULL,
    source text DEFAULT 'user'
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target uuid := record_feedback.conversation_id;
    found_target boolean;
    result uuid;
BEGIN
    PERFORM sessiontag._check_user(record_feedback.user_id);
    IF record_feedback.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'null_value_not_allowed', COLUMN = 'user_id';
    END IF;
    PERFORM sessiontag._raise(coalesce(
        sessiontag._text_problem('name', record_feedback.name, 200, true),
        sessiontag._text_problem('label', record_feedback.label, 200, false),
        sessiontag._text_problem('comment', record_feedback.comment, 10000, false),
        sessiontag._text_problem('source', record_feedback.source, 100, true),
        sessiontag._id_problem('trace_id', record_feedback.trace_id, false),
        sessiontag._id_problem('span_id', record_feedback.span_id, false)));
    IF record_feedback.value IN ('NaN', 'Infinity', '-Infinity') THEN
        RAISE EXCEPTION 'value must be a finite number, got %', record_feedback.value
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'value';
    END IF;
    -- Values are doubles: the statistics over them (session_summary, compare_metrics) are.
    IF record_feedback.value <> 0
       AND NOT abs(record_feedback.value) BETWEEN 4.9406564584124654e-324 AND 1.7976931348623157e308 THEN
        RAISE EXCEPTION 'value must fit a double precision (0 or a magnitude from 4.9406564584124654e-324 to 1.7976931348623157e308), got %',
            CASE WHEN length(record_feedback.value::text) > 30 THEN btrim(to_char(record_feedback.value, '9.999999EEEE'))
                 ELSE record_feedback.value::text END
            USING ERRCODE = 'numeric_value_out_of_range', COLUMN = 'value';
    END IF;
    IF record_feedback.value IS NULL AND record_feedback.label IS NULL THEN
        RAISE EXCEPTION 'value or label must be given' USING ERRCODE = 'invalid_parameter_value', COLUMN = 'value';
    END IF;
    IF record_feedback.conversation_id IS NULL AND record_feedback.trace_id IS NULL THEN
        RAISE EXCEPTION 'conversation_id or trace_id must be given (the session, trace or span the feedback is about)'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'conversation_id';
    END IF;
    IF record_feedback.span_id IS NOT NULL AND record_feedback.trace_id IS NULL THEN
        RAISE EXCEPTION 'span_id needs its trace_id' USING ERRCODE = 'invalid_parameter_value', COLUMN = 'span_id';
    END IF;
    IF record_feedback.trace_id IS NOT NULL THEN
        -- The trace's conversation, from its root span first (a trace is one conversation's).
        SELECT true, t.conversation_id INTO found_target, target
        FROM sessiontag.llm_traces t
        WHERE t.user_id = record_feedback.user_id AND t.trace_id = record_feedback.trace_id
          AND (record_feedback.span_id IS NULL OR t.span_id = record_feedback.span_id)
        ORDER BY t.parent_span_id IS NULL DESC, t.conversation_id IS NULL, t.start_time
        LIMIT 1;
        IF NOT coalesce(found_target, false) THEN
            IF record_feedback.span_id IS NULL THEN
                RAISE EXCEPTION 'trace_id % not found for user_id %', record_feedback.trace_id, record_feedback.user_id
                    USING ERRCODE = 'no_data_found', COLUMN = 'trace_id';
            END IF;
            RAISE EXCEPTION 'span_id % of trace_id % not found for user_id %', record_feedback.span_id,
                record_feedback.trace_id, record_feedback.user_id
                USING ERRCODE = 'no_data_found', COLUMN = 'span_id';
        END IF;
        IF record_feedback.conversation_id IS NOT NULL AND target IS DISTINCT FROM record_feedback.conversation_id THEN
            RAISE EXCEPTION 'conversation_id % is not the conversation of trace_id % (%)', record_feedback.conversation_id,
                record_feedback.trace_id, coalesce(target::text, 'it has none')
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'conversation_id';
        END IF;
    ELSIF NOT EXISTS (SELECT FROM sessiontag.conversations c
                      WHERE c.user_id = record_feedback.user_id AND c.id = record_feedback.conversation_id) THEN
        RAISE EXCEPTION 'conversation_id % not found for user_id %', record_feedback.conversation_id,
            record_feedback.user_id
            USING ERRCODE = 'no_data_found', COLUMN = 'conversation_id';
    END IF;
    INSERT INTO sessiontag.feedback AS f (user_id, conversation_id, trace_id, span_id, name, value, label, comment,
                                          source)
    VALUES (record_feedback.user_id, target, record_feedback.trace_id, record_feedback.span_id, record_feedback.name,
            record_feedback.value, record_feedback.label, record_feedback.comment, record_feedback.source)
    ON CONFLICT ON CONSTRAINT feedback_target_key DO UPDATE
        SET value = excluded.value, label = excluded.label, comment = excluded.comment, updated_at = excluded.updated_at
    RETURNING f.id INTO result;
    RETURN result;
END
$$;

-- Deletes feedback of user_id: the row `id`, or the one of (target, name, source) as
-- record_feedback takes them. Returns how many rows it deleted (0 or 1).
CREATE FUNCTION sessiontag.delete_feedback(
    user_id uuid,
    id uuid DEFAULT NULL,
    name text DEFAULT NULL,
    conversation_id uuid DEFAULT NULL,
    trace_id text DEFAULT NULL,
    span_id text DEFAULT NULL,
    source text DEFAULT 'user'
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted integer;
BEGIN
    PERFORM sessiontag._check_user(delete_feedback.user_id);
    IF delete_feedback.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'null_value_not_allowed', COLUMN = 'user_id';
    END IF;
    IF delete_feedback.id IS NOT NULL THEN
        IF num_nonnulls(delete_feedback.name, delete_feedback.conversation_id, delete_feedback.trace_id,
                        delete_feedback.span_id) > 0 THEN
            RAISE EXCEPTION 'id names one feedback row: give it alone, or name, its target and source instead'
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'id';
        END IF;
        WITH gone AS (
            DELETE FROM sessiontag.feedback f WHERE f.user_id = delete_feedback.user_id AND f.id = delete_feedback.id
            RETURNING 1
        ) SELECT count(*) INTO deleted FROM gone;
        RETURN deleted;
    END IF;
    IF delete_feedback.name IS NULL THEN
        RAISE EXCEPTION 'id, or name with its target, must be given' USING ERRCODE = 'invalid_parameter_value',
            COLUMN = 'name';
    END IF;
    IF delete_feedback.conversation_id IS NULL AND delete_feedback.trace_id IS NULL THEN
        RAISE EXCEPTION 'conversation_id or trace_id must be given (the target of the feedback to delete)'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'conversation_id';
    END IF;
    WITH gone AS (
        DELETE FROM sessiontag.feedback f
        WHERE f.user_id = delete_feedback.user_id AND f.name = delete_feedback.name
          AND f.source = delete_feedback.source
          AND f.trace_id IS NOT DISTINCT FROM delete_feedback.trace_id
          AND f.span_id IS NOT DISTINCT FROM delete_feedback.span_id
          AND (delete_feedback.conversation_id IS NULL OR f.conversation_id = delete_feedback.conversation_id)
        RETURNING 1
    ) SELECT count(*) INTO deleted FROM gone;
    RETURN deleted;
END
$$;

-- A feedback row as list_feedback returns it: the row, its session's tag and a cursor.
CREATE TYPE sessiontag.feedback_listing AS (
    id uuid, user_id uuid, session_id text, conversation_id uuid, trace_id text, span_id text, name text,
    value numeric, label text, comment text, source text, created_at timestamptz, updated_at timestamptz,
    cursor text
);

-- Feedback, newest first (by when it was first recorded), every filter optional; keyset
-- pagination as in list_traces.
CREATE FUNCTION sessiontag.list_feedback(
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

-- Access control (see 60_access.sql for the design). The writers are the SECURITY
-- DEFINER functions above; the roles read the table through row-level security.
REVOKE ALL ON sessiontag.feedback FROM PUBLIC;
REVOKE ALL ON FUNCTION sessiontag.record_feedback(uuid, text, numeric, text, uuid, text, text, text, text),
    sessiontag.delete_feedback(uuid, uuid, text, uuid, text, text, text),
    sessiontag.list_feedback(uuid, uuid, text, text, text, text, integer) FROM PUBLIC;
GRANT SELECT ON sessiontag.feedback TO sessiontag_app, sessiontag_user, sessiontag_reader;
GRANT EXECUTE ON FUNCTION sessiontag.list_feedback(uuid, uuid, text, text, text, text, integer)
    TO sessiontag_app, sessiontag_user, sessiontag_reader;
GRANT EXECUTE ON FUNCTION
    sessiontag.record_feedback(uuid, text, numeric, text, uuid, text, text, text, text),
    sessiontag.delete_feedback(uuid, uuid, text, uuid, text, text, text)
    TO sessiontag_app, sessiontag_user;

-- One permissive policy: every role holding a table privilege sees every row, except a
-- member of sessiontag_user, which sees and writes only the rows of sessiontag.user_id
-- (none when it is unset). The membership test is a scalar subquery, so it runs once per
-- statement, not once per row.
ALTER TABLE sessiontag.feedback ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY access ON sessiontag.feedback TO PUBLIC
    USING ((SELECT NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER'))
           OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK ((SELECT NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER'))
                OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);

-- list_sessions and session_summary: two more columns, and the rows built from the keys.
ALTER TYPE sessiontag.session_summary ADD ATTRIBUTE feedback_count bigint, ADD ATTRIBUTE feedback jsonb;
DROP FUNCTION sessiontag._summarize(sessiontag.conversations);

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

REVOKE ALL ON FUNCTION sessiontag._summarize(uuid[], uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sessiontag._summarize(uuid[], uuid[]) TO sessiontag_app, sessiontag_user, sessiontag_reader;

-- log Γ(x) for x > 0: Lanczos' approximation (g = 7, 9 terms), relative error ~1e-15.
CREATE FUNCTION sessiontag._lgamma(x double precision)
RETURNS double precision
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c double precision[] := ARRAY[0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
                                  -176.61502916214059, 12.507343278686905, -0.13857109526572012,
                                  9.9843695780195716e-6, 1.5056327351493116e-7];
    y double precision := _lgamma.x - 1;
    s double precision := c[1];
    t double precision;
BEGIN
    IF _lgamma.x < 0.5 THEN  -- reflection: Γ(x)Γ(1-x) = π / sin(πx)
        RETURN ln(pi() / abs(sin(pi() * _lgamma.x))) - sessiontag._lgamma(1 - _lgamma.x);
    END IF;
    FOR i IN 1..8 LOOP
        s := s + c[i + 1] / (y + i);
    END LOOP;
    t := y + 7.5;
    RETURN 0.5 * ln(2 * pi()) + (y + 0.5) * ln(t) - t + ln(s);
END
$$;

-- The regularized incomplete beta function I_x(a, b): the continued fraction (modified
-- Lentz), on the side of x where it converges fast.
CREATE FUNCTION sessiontag._beta_inc(a double precision, b double precision, x double precision)
RETURNS double precision
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    swap boolean := _beta_inc.x > (_beta_inc.a + 1) / (_beta_inc.a + _beta_inc.b + 2);
    p double precision := CASE WHEN swap THEN _beta_inc.b ELSE _beta_inc.a END;
    q double precision := CASE WHEN swap THEN _beta_inc.a ELSE _beta_inc.b END;
    z double precision := CASE WHEN swap THEN 1 - _beta_inc.x ELSE _beta_inc.x END;
    tiny constant double precision := 1e-300;
    front double precision;
    c double precision := 1;
    d double precision;
    h double precision;
    aa double precision;
    delta double precision;
    m2 integer;
BEGIN
    IF _beta_inc.x <= 0 THEN
        RETURN 0;
    ELSIF _beta_inc.x >= 1 THEN
        RETURN 1;
    END IF;
    front := exp(sessiontag._lgamma(p + q) - sessiontag._lgamma(p) - sessiontag._lgamma(q)
                 + p * ln(z) + q * ln(1 - z)) / p;
    d := 1 - (p + q) * z / (p + 1);
    IF abs(d) < tiny THEN d := tiny; END IF;
    d := 1 / d;
    h := d;
    FOR m IN 1..100000 LOOP
        m2 := 2 * m;
        aa := m * (q - m) * z / ((p - 1 + m2) * (p + m2));
        d := 1 + aa * d;
        IF abs(d) < tiny THEN d := tiny; END IF;
        c := 1 + aa / c;
        IF abs(c) < tiny THEN c := tiny; END IF;
        d := 1 / d;
        h := h * d * c;
        aa := -(p + m) * (p + q + m) * z / ((p + m2) * (p + 1 + m2));
        d := 1 + aa * d;
        IF abs(d) < tiny THEN d := tiny; END IF;
        c := 1 + aa / c;
        IF abs(c) < tiny THEN c := tiny; END IF;
        d := 1 / d;
        delta := d * c;
        h := h * delta;
        EXIT WHEN abs(delta - 1) < 1e-15;
    END LOOP;
    RETURN CASE WHEN swap THEN 1 - front * h ELSE front * h END;
END
$$;

-- P(X <= k) for X ~ Binomial(n, p).
CREATE FUNCTION sessiontag._binom_cdf(k bigint, n bigint, p double precision DEFAULT 0.5)
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN _binom_cdf.k < 0 THEN 0
                WHEN _binom_cdf.k >= _binom_cdf.n THEN 1
                ELSE sessiontag._beta_inc(_binom_cdf.n - _binom_cdf.k, _binom_cdf.k + 1, 1 - _binom_cdf.p) END
$$;

-- The standard normal quantile Φ⁻¹(p): Acklam's rational approximation, relative error
-- below 1.2e-9.
CREATE FUNCTION sessiontag._norm_quantile(p double precision)
RETURNS double precision
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a double precision[] := ARRAY[-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                                  1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00];
    b double precision[] := ARRAY[-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                                  6.680131188771972e+01, -1.328068155288572e+01];
    c double precision[] := ARRAY[-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                                  -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00];
    d double precision[] := ARRAY[7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                                  3.754408661907416e+00];
    q double precision;
    r double precision;
BEGIN
    IF _norm_quantile.p <= 0 OR _norm_quantile.p >= 1 THEN
        RAISE EXCEPTION 'p must be strictly between 0 and 1, got %', _norm_quantile.p
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF _norm_quantile.p < 0.02425 OR _norm_quantile.p > 1 - 0.02425 THEN
        q := sqrt(-2 * ln(least(_norm_quantile.p, 1 - _norm_quantile.p)));
        r := (((((c[1] * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) * q + c[6])
             / ((((d[1] * q + d[2]) * q + d[3]) * q + d[4]) * q + 1);
        RETURN CASE WHEN _norm_quantile.p < 0.5 THEN r ELSE -r END;
    END IF;
    q := _norm_quantile.p - 0.5;
    r := q * q;
    RETURN (((((a[1] * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * r + a[6]) * q
           / (((((b[1] * r + b[2]) * r + b[3]) * r + b[4]) * r + b[5]) * r + 1);
END
$$;

-- P(T <= t) for Student's t with df degrees of freedom (df > 0, not necessarily whole).
CREATE FUNCTION sessiontag._t_cdf(t double precision, df double precision)
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN _t_cdf.t > 0 THEN 1 - tail ELSE tail END
    FROM (SELECT 0.5 * sessiontag._beta_inc(_t_cdf.df / 2, 0.5, _t_cdf.df / (_t_cdf.df + _t_cdf.t * _t_cdf.t))
          AS tail) s
$$;

-- The quantile of Student's t: Newton's method on _t_cdf from the normal quantile with
-- its Cornish-Fisher correction, kept inside a bracket that bisection narrows whenever a
-- Newton step would leave it. Converges to ~1e-12 in a few steps.
CREATE FUNCTION sessiontag._t_quantile(p double precision, df double precision)
RETURNS double precision
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    upper_p double precision := greatest(_t_quantile.p, 1 - _t_quantile.p);
    z double precision;
    t double precision;
    lo double precision := 0;
    hi double precision;
    f double precision;
    density double precision;
    log_norm double precision;
    step double precision;
BEGIN
    IF _t_quantile.df <= 0 OR _t_quantile.df = 'NaN' THEN
        RAISE EXCEPTION 'df must be positive, got %', _t_quantile.df USING ERRCODE = 'invalid_parameter_value';
    END IF;
    z := sessiontag._norm_quantile(upper_p);
    IF _t_quantile.df > 1e10 OR upper_p = 0.5 THEN
        RETURN CASE WHEN _t_quantile.p < 0.5 THEN -z ELSE z END;
    END IF;
    t := z + (z ^ 3 + z) / (4 * _t_quantile.df)
           + (5 * z ^ 5 + 16 * z ^ 3 + 3 * z) / (96 * _t_quantile.df ^ 2);
    hi := greatest(2 * t, 1);
    WHILE sessiontag._t_cdf(hi, _t_quantile.df) < upper_p LOOP
        lo := hi;
        hi := hi * 4;
    END LOOP;
    IF t <= lo OR t >= hi THEN t := (lo + hi) / 2; END IF;
    log_norm := sessiontag._lgamma((_t_quantile.df + 1) / 2) - sessiontag._lgamma(_t_quantile.df / 2)
                - 0.5 * ln(_t_quantile.df * pi());
    FOR i IN 1..200 LOOP
        f := sessiontag._t_cdf(t, _t_quantile.df) - upper_p;
        IF f > 0 THEN hi := t; ELSE lo := t; END IF;
        density := exp(log_norm - (_t_quantile.df + 1) / 2 * ln(1 + t * t / _t_quantile.df));
        step := f / density;
        IF t - step <= lo OR t - step >= hi THEN
            step := t - (lo + hi) / 2;
        END IF;
        t := t - step;
        EXIT WHEN abs(step) <= 1e-13 * greatest(1, abs(t)) OR hi - lo <= 1e-13 * greatest(1, abs(t));
    END LOOP;
    RETURN CASE WHEN _t_quantile.p < 0.5 THEN -t ELSE t END;
END
$$;

-- The two-sided critical value of the standard normal for a confidence level.
CREATE FUNCTION sessiontag._z(confidence double precision)
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sessiontag._norm_quantile(1 - (1 - _z.confidence) / 2)
$$;

-- Wilson's score interval for a proportion x/n.
CREATE FUNCTION sessiontag._wilson(x bigint, n bigint, confidence double precision,
                                   OUT low double precision, OUT high double precision)
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    z double precision := sessiontag._z(_wilson.confidence);
    p double precision;
    center double precision;
    half double precision;
BEGIN
    IF _wilson.n <= 0 THEN
        RETURN;
    END IF;
    p := _wilson.x::double precision / _wilson.n;
    center := (p + z * z / (2 * _wilson.n)) / (1 + z * z / _wilson.n);
    half := z * sqrt(p * (1 - p) / _wilson.n + z * z / (4.0 * _wilson.n * _wilson.n)) / (1 + z * z / _wilson.n);
    low := center - half;
    high := center + half;
END
$$;

-- Newcombe's hybrid score interval (his method 10) for p1 - p2, from the Wilson
-- intervals of each proportion.
CREATE FUNCTION sessiontag._newcombe(x1 bigint, n1 bigint, x2 bigint, n2 bigint, confidence double precision,
                                     OUT diff double precision, OUT low double precision, OUT high double precision)
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p1 double precision;
    p2 double precision;
    w1 record;
    w2 record;
BEGIN
    IF _newcombe.n1 <= 0 OR _newcombe.n2 <= 0 THEN
        RETURN;
    END IF;
    p1 := _newcombe.x1::double precision / _newcombe.n1;
    p2 := _newcombe.x2::double precision / _newcombe.n2;
    SELECT * INTO w1 FROM sessiontag._wilson(_newcombe.x1, _newcombe.n1, _newcombe.confidence);
    SELECT * INTO w2 FROM sessiontag._wilson(_newcombe.x2, _newcombe.n2, _newcombe.confidence);
    diff := p1 - p2;
    low := diff - sqrt((p1 - w1.low) ^ 2 + (w2.high - p2) ^ 2);
    high := diff + sqrt((w1.high - p1) ^ 2 + (p2 - w2.low) ^ 2);
END
$$;

-- The t interval of a mean from its sample mean, variance and size (n >= 2). The
-- arithmetic is numeric, so no input overflows or underflows: a bound past the largest
-- double is ±Infinity (an infinite variance gives (-Infinity, Infinity)).
CREATE FUNCTION sessiontag._t_interval(mean double precision, variance double precision, n bigint,
                                       confidence double precision,
                                       OUT low double precision, OUT high double precision)
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    half numeric;
BEGIN
    IF _t_interval.n < 2 THEN
        RETURN;
    END IF;
    half := CASE WHEN _t_interval.variance = 0 THEN 0
                 ELSE sessiontag._t_quantile(1 - (1 - _t_interval.confidence) / 2, _t_interval.n - 1)::numeric
                      * sqrt(_t_interval.variance::numeric / _t_interval.n) END;
    low := sessiontag._float(_t_interval.mean::numeric - half);
    high := sessiontag._float(_t_interval.mean::numeric + half);
END
$$;

-- Welch's interval for mean1 - mean2 (unequal variances, Welch–Satterthwaite degrees of
-- freedom); both sizes >= 2. Numeric arithmetic, as in _t_interval: a bound or a
-- difference past the largest double is ±Infinity, nothing overflows or underflows.
CREATE FUNCTION sessiontag._welch(mean1 double precision, var1 double precision, n1 bigint,
                                  mean2 double precision, var2 double precision, n2 bigint,
                                  confidence double precision,
                                  OUT diff double precision, OUT low double precision, OUT high double precision)
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a numeric;
    b numeric;
    d numeric;
    half numeric := 0;
BEGIN
    IF _welch.n1 < 2 OR _welch.n2 < 2 THEN
        RETURN;
    END IF;
    a := _welch.var1::numeric / _welch.n1;
    b := _welch.var2::numeric / _welch.n2;
    d := _welch.mean1::numeric - _welch.mean2::numeric;
    IF a = 'Infinity' OR b = 'Infinity' THEN
        half := 'Infinity';
    ELSIF a + b > 0 THEN
        half := sessiontag._t_quantile(1 - (1 - _welch.confidence) / 2,
                                       ((a + b) * (a + b) / (a * a / (_welch.n1 - 1) + b * b / (_welch.n2 - 1)))
                                           ::double precision)::numeric
                * sqrt(a + b);
    END IF;
    diff := sessiontag._float(d);
    low := sessiontag._float(d - half);
    high := sessiontag._float(d + half);
END
$$;

-- The median of a sample sorted ascending.
CREATE FUNCTION sessiontag._median(sorted double precision[])
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (_median.sorted[(n + 1) / 2] + _median.sorted[n / 2 + 1]) / 2
    FROM (SELECT cardinality(_median.sorted) AS n) s
    WHERE n > 0
$$;

-- The distribution-free interval of a median from order statistics: [x(k), x(n-k+1)]
-- with k the largest rank such that P(B <= k-1) <= (1 - confidence)/2 for B ~
-- Binomial(n, 1/2); its coverage is at least the confidence. NULL bounds when n is too
-- small for one (n < 6 at 95%). `sorted` is the sample sorted ascending.
CREATE FUNCTION sessiontag._median_interval(sorted double precision[], confidence double precision,
                                            OUT median double precision, OUT low double precision,
                                            OUT high double precision)
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := cardinality(_median_interval.sorted);
    alpha double precision := 1 - _median_interval.confidence;
    k integer;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    median := sessiontag._median(_median_interval.sorted);
    -- Start from the normal approximation of the rank, then step to the exact one.
    k := greatest(0, floor(n / 2.0 - sessiontag._z(_median_interval.confidence) * sqrt(n) / 2)::integer);
    WHILE k > 0 AND sessiontag._binom_cdf(k - 1, n) > alpha / 2 LOOP
        k := k - 1;
    END LOOP;
    WHILE sessiontag._binom_cdf(k, n) <= alpha / 2 LOOP
        k := k + 1;
    END LOOP;
    IF k >= 1 THEN
        low := _median_interval.sorted[k];
        high := _median_interval.sorted[n - k + 1];
    END IF;
END
$$;

-- Price and Bonett's (2002) distribution-free standard error of a sample median, from
-- the order statistics x(c) and x(n-c+1), c = round(n/2 - √n) (at least 1), which bound
-- an interval of exact coverage 1 - 2·P(B <= c-1): se = (x(n-c+1) - x(c)) / (2 z) with
-- z = Φ⁻¹(1 - P(B <= c-1)). `sorted` is the sample sorted ascending (n >= 2).
CREATE FUNCTION sessiontag._median_se(sorted double precision[])
RETURNS double precision
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := cardinality(_median_se.sorted);
    c integer;
BEGIN
    IF n < 2 THEN
        RETURN NULL;
    END IF;
    c := greatest(1, round(n / 2.0 - sqrt(n)::double precision)::integer);  -- half to even, as R and Python
    RETURN (_median_se.sorted[n - c + 1] - _median_se.sorted[c])
           / (2 * sessiontag._norm_quantile(1 - sessiontag._binom_cdf(c - 1, n)));
END
$$;

-- Price and Bonett's interval for median1 - median2: the difference ± z·√(se1² + se2²).
CREATE FUNCTION sessiontag._median_diff(sorted1 double precision[], sorted2 double precision[],
                                        confidence double precision,
                                        OUT diff double precision, OUT low double precision,
                                        OUT high double precision)
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    half double precision;
BEGIN
    half := sessiontag._z(_median_diff.confidence)
            * sqrt(sessiontag._median_se(_median_diff.sorted1) ^ 2 + sessiontag._median_se(_median_diff.sorted2) ^ 2);
    diff := sessiontag._median(_median_diff.sorted1) - sessiontag._median(_median_diff.sorted2);
    low := diff - half;
    high := diff + half;
END
$$;

-- Below this many sessions per model (for the metric: sessions with a latency, sessions
-- with feedback), compare_metrics gives no verdict: the large-sample approximations
-- behind the difference intervals are not yet trustworthy.
CREATE FUNCTION sessiontag._min_sessions()
RETURNS bigint
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 10::bigint
$$;

-- The verdict on model - baseline: better or worse when the difference's interval
-- excludes 0 (which side is better depends on the metric), no clear difference when it
-- does not, too few sessions below _min_sessions() on either side.
CREATE FUNCTION sessiontag._verdict(diff_low double precision, diff_high double precision, higher_is_better boolean,
                                    sessions bigint, baseline_sessions bigint)
RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN coalesce(_verdict.sessions, 0) < sessiontag._min_sessions()
             OR coalesce(_verdict.baseline_sessions, 0) < sessiontag._min_sessions()
             OR _verdict.diff_low IS NULL OR _verdict.diff_high IS NULL THEN 'too few sessions'
        WHEN _verdict.diff_low > 0 THEN CASE WHEN _verdict.higher_is_better THEN 'better' ELSE 'worse' END
        WHEN _verdict.diff_high < 0 THEN CASE WHEN _verdict.higher_is_better THEN 'worse' ELSE 'better' END
        ELSE 'no clear difference'
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
CREATE FUNCTION sessiontag.compare_metrics(
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

-- Access control (see 60_access.sql for the design): compare_metrics reads as its
-- caller, like compare_models, and the pure helpers run as the caller too.
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'sessiontag._lgamma(double precision)',
        'sessiontag._beta_inc(double precision, double precision, double precision)',
        'sessiontag._binom_cdf(bigint, bigint, double precision)',
        'sessiontag._norm_quantile(double precision)',
        'sessiontag._t_cdf(double precision, double precision)',
        'sessiontag._t_quantile(double precision, double precision)',
        'sessiontag._z(double precision)',
        'sessiontag._wilson(bigint, bigint, double precision)',
        'sessiontag._newcombe(bigint, bigint, bigint, bigint, double precision)',
        'sessiontag._t_interval(double precision, double precision, bigint, double precision)',
        'sessiontag._welch(double precision, double precision, bigint, double precision, double precision, bigint, double precision)',
        'sessiontag._median(double precision[])',
        'sessiontag._median_interval(double precision[], double precision)',
        'sessiontag._median_se(double precision[])',
        'sessiontag._median_diff(double precision[], double precision[], double precision)',
        'sessiontag._min_sessions()',
        'sessiontag._verdict(double precision, double precision, boolean, bigint, bigint)',
        'sessiontag.compare_metrics(uuid, uuid[], timestamptz, timestamptz, uuid, text, numeric)'
    ] LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO sessiontag_app, sessiontag_user, sessiontag_reader', f);
    END LOOP;
END
$$;

-- Feedback kept by a rollback of this migration: back, for the conversations and spans
-- still there (the others' feedback went with them, as it would have by cascade).
DO $$
BEGIN
    IF to_regclass('sessiontag_archive.feedback') IS NOT NULL THEN
        INSERT INTO sessiontag.feedback
        SELECT a.* FROM sessiontag_archive.feedback a
        WHERE (a.conversation_id IS NULL OR EXISTS (SELECT FROM sessiontag.conversations c
                                                    WHERE c.user_id = a.user_id AND c.id = a.conversation_id))
          AND (a.span_id IS NULL OR EXISTS (SELECT FROM sessiontag.llm_traces t WHERE t.user_id = a.user_id
                                            AND t.trace_id = a.trace_id AND t.span_id = a.span_id));
        DROP TABLE sessiontag_archive.feedback;
        IF NOT EXISTS (SELECT FROM pg_class WHERE relnamespace = to_regnamespace('sessiontag_archive')) THEN
            DROP SCHEMA sessiontag_archive;
        END IF;
    END IF;
END
$$;
