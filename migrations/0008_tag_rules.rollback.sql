-- Restores the bodies of 0003, 0004 and 0006 (numbers may again be lost to
-- INSERT ... ON CONFLICT; the app role may again use any user's private model).

CREATE OR REPLACE FUNCTION sessiontag.generate_session_tag(user_id uuid, model_id uuid)
RETURNS sessiontag.session_tag
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    n bigint;
    scoped uuid;
BEGIN
    IF generate_session_tag.user_id IS NULL OR generate_session_tag.model_id IS NULL THEN
        RETURN NULL;
    END IF;
    scoped := sessiontag._scoped_user();
    IF generate_session_tag.user_id <> scoped THEN
        RETURN NULL;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tag.model_id AND tracked AND (scoped IS NULL OR owner_id IS NULL OR owner_id = scoped);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    n := sessiontag._take_counter(generate_session_tag.user_id, m.id);
    RETURN ROW(sessiontag._format_tag(m.short_id, n), m.name, n, m.id, m.name)::sessiontag.session_tag;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag.generate_session_tags(user_id uuid, model_id uuid, n integer)
RETURNS SETOF sessiontag.session_tag
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    last bigint;
    scoped uuid := sessiontag._scoped_user();
BEGIN
    IF generate_session_tags.n IS NULL OR generate_session_tags.n < 0 OR generate_session_tags.n > 100000 THEN
        RAISE EXCEPTION 'n must be between 0 and 100000, got %', coalesce(generate_session_tags.n::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF generate_session_tags.user_id IS NULL OR generate_session_tags.model_id IS NULL
       OR generate_session_tags.n = 0 OR generate_session_tags.user_id <> scoped THEN
        RETURN;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tags.model_id AND tracked AND (scoped IS NULL OR owner_id IS NULL OR owner_id = scoped);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    last := sessiontag._take_counter(generate_session_tags.user_id, m.id, generate_session_tags.n);
    RETURN QUERY
        SELECT sessiontag._format_tag(m.short_id, k), m.name, k, m.id, m.name
        FROM generate_series(last - generate_session_tags.n + 1, last) AS k;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._conversations_tag()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    parts text[];
    issued bigint;
    scoped uuid := sessiontag._check_user(NEW.user_id);
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.session_id IS NOT NULL AND (NEW.session_id IS DISTINCT FROM OLD.session_id
                                           OR NEW.session_counter IS DISTINCT FROM OLD.session_counter) THEN
            RAISE EXCEPTION 'conversation % already has session tag %; a tag never changes', OLD.id, OLD.session_id
                USING ERRCODE = 'invalid_parameter_value';
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
        WHERE id = NEW.llm_model_id AND (scoped IS NULL OR owner_id IS NULL OR owner_id = scoped);
        IF NOT FOUND THEN
            RAISE EXCEPTION 'llm_model_id % is not a registered model', NEW.llm_model_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;

    IF NEW.session_id IS NULL THEN
        IF NEW.session_counter IS NOT NULL THEN
            RAISE EXCEPTION 'session_counter is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF TG_OP = 'INSERT' AND m.tracked THEN
            NEW.session_counter := sessiontag._take_counter(NEW.user_id, m.id);
            NEW.session_id := sessiontag._format_tag(m.short_id, NEW.session_counter);
            NEW.experiment_name := m.name;
        END IF;
        RETURN NEW;
    END IF;

    parts := regexp_match(NEW.session_id, '^chat_model_([0-9a-f]{6,32})_([0-9]{1,18})$');
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
        SELECT c.last_value INTO issued FROM sessiontag.session_counters c
        WHERE c.user_id = NEW.user_id AND c.model_id = m.id;
        IF m.short_id IS DISTINCT FROM parts[1] OR parts[2]::bigint NOT BETWEEN 1 AND coalesce(issued, 0)
           OR coalesce(NEW.session_counter, parts[2]::bigint) <> parts[2]::bigint
           OR NEW.session_id <> sessiontag._format_tag(m.short_id, parts[2]::bigint) THEN
            RAISE EXCEPTION 'session_id % has the form of an automatic tag but was not issued for this user and model', NEW.session_id
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Take it from generate_session_tag in the same transaction, or choose a tag of another form.';
        END IF;
        NEW.llm_model_id := m.id;
        NEW.session_counter := parts[2]::bigint;
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

CREATE OR REPLACE FUNCTION sessiontag.ensure_session_tag(conversation_id uuid, model_id uuid DEFAULT NULL, user_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._check_user(ensure_session_tag.user_id);
    c sessiontag.conversations := sessiontag._lock_conversation(ensure_session_tag.conversation_id,
                                                                coalesce(ensure_session_tag.user_id, scoped));
    tag sessiontag.session_tag;
BEGIN
    IF c.session_id IS NOT NULL THEN
        RETURN c.session_id;
    END IF;
    IF ensure_session_tag.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = ensure_session_tag.model_id
                       AND (scoped IS NULL OR m.owner_id IS NULL OR m.owner_id = scoped)) THEN
        RAISE EXCEPTION 'model_id % is not a registered model', ensure_session_tag.model_id
            USING ERRCODE = 'no_data_found';
    END IF;
    tag := sessiontag.generate_session_tag(c.user_id, coalesce(ensure_session_tag.model_id, c.llm_model_id));
    IF tag IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE sessiontag.conversations u
    SET session_id = tag.session_id, session_counter = tag.counter,
        experiment_name = tag.experiment_name, llm_model_id = tag.model_id
    WHERE u.user_id = c.user_id AND u.id = c.id;
    RETURN tag.session_id;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._refs_problem(user_id uuid, conversation_id uuid, model_id uuid, session_tag text)
RETURNS sessiontag._problem
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    conv sessiontag.conversations;
    scoped uuid := sessiontag._scoped_user();
BEGIN
    IF _refs_problem.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = _refs_problem.model_id
                       AND (scoped IS NULL OR m.owner_id IS NULL OR m.owner_id = scoped)) THEN
        RETURN ROW('model_id', format('%s is not a registered model', _refs_problem.model_id),
                   'P0002')::sessiontag._problem;
    END IF;
    IF _refs_problem.conversation_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO conv FROM sessiontag.conversations c
    WHERE c.user_id = _refs_problem.user_id AND c.id = _refs_problem.conversation_id;
    IF NOT FOUND THEN
        RETURN ROW('conversation_id', format('%s not found for user_id %s', _refs_problem.conversation_id,
                                             _refs_problem.user_id), 'P0002')::sessiontag._problem;
    END IF;
    IF _refs_problem.session_tag IS DISTINCT FROM conv.session_id AND _refs_problem.session_tag IS NOT NULL THEN
        RETURN ROW('session_tag',
                   CASE WHEN conv.session_id IS NULL
                        THEN format('%L is given, but conversation %s has no session tag', _refs_problem.session_tag,
                                    conv.id)
                        ELSE format('%L contradicts the session tag %L of conversation %s', _refs_problem.session_tag,
                                    conv.session_id, conv.id) END
                   || ' (omit session_tag: a trace carries its conversation''s tag)',
                   '22023')::sessiontag._problem;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION sessiontag._ingest_insert(spans jsonb, with_untagged boolean)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    inserted integer;
    scoped uuid := sessiontag._scoped_user();
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
                                      AND (scoped IS NULL OR m.owner_id IS NULL OR m.owner_id = scoped)
    -- One CASE, so every row is checked before it can be skipped (separate quals could be
    -- reordered). Mirrors _element_problem where no constraint of llm_traces does.
    WHERE CASE
        WHEN e.elem - sessiontag._span_fields() <> '{}'::jsonb
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
