-- ingest_traces checks its JSON for less: the checks only JSON needs (unknown keys, text
-- fields that are not JSON strings, times that do not begin with an ISO 8601 date) are
-- the same, written cheaper, and each time is cast once. Nothing it accepts or refuses
-- changes.
-- depends: 0014_citus

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
