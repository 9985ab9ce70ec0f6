-- Undoes 0012_ab_testing. Never loses feedback: rows move to
-- sessiontag_archive.feedback, where applying 0012_ab_testing again finds them.

DROP FUNCTION
    sessiontag._lgamma(double precision),
    sessiontag._beta_inc(double precision, double precision, double precision),
    sessiontag._binom_cdf(bigint, bigint, double precision),
    sessiontag._norm_quantile(double precision),
    sessiontag._t_cdf(double precision, double precision),
    sessiontag._t_quantile(double precision, double precision),
    sessiontag._z(double precision),
    sessiontag._wilson(bigint, bigint, double precision),
    sessiontag._newcombe(bigint, bigint, bigint, bigint, double precision),
    sessiontag._t_interval(double precision, double precision, bigint, double precision),
    sessiontag._welch(double precision, double precision, bigint, double precision, double precision, bigint,
                      double precision),
    sessiontag._median(double precision[]),
    sessiontag._median_interval(double precision[], double precision),
    sessiontag._median_se(double precision[]),
    sessiontag._median_diff(double precision[], double precision[], double precision),
    sessiontag._min_sessions(),
    sessiontag._verdict(double precision, double precision, boolean, bigint, bigint),
    sessiontag.compare_metrics(uuid, uuid[], timestamptz, timestamptz, uuid, text, numeric);
DROP FUNCTION sessiontag.list_feedback(uuid, uuid, text, text, text, text, integer);
DROP TYPE sessiontag.feedback_listing;
DROP FUNCTION sessiontag.record_feedback(uuid, text, numeric, text, uuid, text, text, text, text);
DROP FUNCTION sessiontag.delete_feedback(uuid, uuid, text, uuid, text, text, text);

-- list_sessions and session_summary as before: a row per conversation through _summarize.
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
    q text := 'SELECT (sessiontag._summarize(p)).* FROM (SELECT * FROM sessiontag.conversations v'
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
    q := q || ' ORDER BY v.created_at DESC, v.user_id DESC, v.id DESC LIMIT $5) p'
              ' ORDER BY p.created_at DESC, p.user_id DESC, p.id DESC';
    RETURN QUERY EXECUTE q USING list_sessions.user_id, list_sessions.model_id, list_sessions.since,
        list_sessions.until, size, after_at, after_user, after_id;
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
BEGIN
    IF session_summary.session_id IS NULL THEN
        RAISE EXCEPTION 'session_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY
    SELECT (sessiontag._summarize(v)).*
    FROM sessiontag.conversations v
    WHERE v.session_id = session_summary.session_id
      AND (session_summary.user_id IS NULL OR v.user_id = session_summary.user_id)
    ORDER BY v.created_at, v.user_id;
END
$$;

DROP FUNCTION sessiontag._summarize(uuid[], uuid[]);
ALTER TYPE sessiontag.session_summary DROP ATTRIBUTE feedback_count, DROP ATTRIBUTE feedback;

CREATE FUNCTION sessiontag._summarize(c sessiontag.conversations)
RETURNS sessiontag.session_summary
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result sessiontag.session_summary;
BEGIN
    SELECT _summarize.c.session_id,
           sessiontag._badge(_summarize.c.experiment_name, _summarize.c.session_id, _summarize.c.session_counter),
           _summarize.c.user_id, _summarize.c.id, _summarize.c.llm_model_id, _summarize.c.experiment_name,
           _summarize.c.session_counter,
           count(DISTINCT t.trace_id),
           count(DISTINCT t.trace_id) FILTER (WHERE t.status = 'error'),
           coalesce(sum(t.input_tokens), 0),
           coalesce(sum(t.output_tokens), 0),
           coalesce(sum(t.cost_usd), 0),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY t.duration_ms) FILTER (WHERE t.operation_type = 'llm_call'),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY t.duration_ms) FILTER (WHERE t.operation_type = 'llm_call'),
           coalesce(min(t.start_time), _summarize.c.created_at),
           coalesce(max(coalesce(t.end_time, t.start_time)), _summarize.c.created_at),
           sessiontag._encode_cursor(_summarize.c.created_at, _summarize.c.user_id, _summarize.c.id)
    INTO result
    FROM sessiontag.llm_traces t
    WHERE t.user_id = _summarize.c.user_id AND t.session_tag = _summarize.c.session_id;
    RETURN result;
END
$$;

REVOKE ALL ON FUNCTION sessiontag._summarize(sessiontag.conversations) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sessiontag._summarize(sessiontag.conversations)
    TO sessiontag_app, sessiontag_user, sessiontag_reader;

DO $$
BEGIN
    IF EXISTS (SELECT FROM sessiontag.feedback) THEN
        CREATE SCHEMA IF NOT EXISTS sessiontag_archive;
        COMMENT ON SCHEMA sessiontag_archive IS 'sessiontag data kept by rollbacks; applying the migrations again takes it back';
        -- Fails, leaving everything in place, if an earlier rollback already kept feedback here.
        CREATE TABLE sessiontag_archive.feedback AS SELECT * FROM sessiontag.feedback;
    END IF;
END
$$;
DROP FUNCTION sessiontag._float(numeric);
DROP TABLE sessiontag.feedback;
