-- sessiontag: feedback on sessions, traces and spans (thumbs, ratings, judges' scores).
--
-- A feedback row attaches a score (value) and/or a label to one target: a session (its
-- conversation), a trace, or a span. One row per (target, name, source): recording again
-- replaces the value. Every row carries its target's conversation (a trace's or span's is
-- read off its spans), so per-session figures (session_summary, compare_metrics) find all
-- of a session's feedback through (user_id, conversation_id).
--
-- Deleting a conversation deletes its feedback (ON DELETE CASCADE): feedback is about the
-- conversation, and a user who deletes one expects what was said about it gone too (its
-- spans stay, for cost accounting, as before). Deleting a span deletes the feedback on
-- that span.

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
    PERFORM sessiontag._not_on_a_shard('list_feedback');
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

-- One permissive policy, as on the other tables (see 60_access.sql): every role holding a
-- table privilege sees every row, except a member of sessiontag_user, which sees and
-- writes only the rows of sessiontag.user_id (none when it is unset).
ALTER TABLE sessiontag.feedback ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY access ON sessiontag.feedback TO PUBLIC
    USING (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
           OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid)
    WITH CHECK (NOT pg_catalog.pg_has_role(current_user, 'sessiontag_user', 'MEMBER')
                OR user_id = nullif(pg_catalog.current_setting('sessiontag.user_id', true), '')::uuid);
