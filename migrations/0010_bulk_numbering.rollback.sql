-- Undoes 0010_bulk_numbering. The earlier numbering reads the next number off
-- last_value alone, so last_value first takes in every number the conversations hold.

UPDATE sessiontag.session_counters c SET last_value = n.top
FROM (SELECT v.user_id, v.llm_model_id, max(v.session_counter) AS top FROM sessiontag.conversations v
      WHERE v.session_counter IS NOT NULL GROUP BY v.user_id, v.llm_model_id) n
WHERE c.user_id = n.user_id AND c.model_id = n.llm_model_id AND c.last_value < n.top;

DROP FUNCTION sessiontag.tag_untagged_conversations(uuid, uuid, integer);
DROP FUNCTION sessiontag.count_untagged_conversations(uuid, uuid);
DROP TRIGGER _300_keep_numbers ON sessiontag.conversations;
DROP FUNCTION sessiontag._conversations_keep_numbers();

-- Takes the next n numbers of (user_id, model_id) and returns the last one. The counter
-- row stays locked until the caller's transaction ends: concurrent callers of the same
-- key queue behind it, callers of other keys do not; a rollback undoes the increment.
-- O(1): no scan of earlier conversations.
CREATE OR REPLACE FUNCTION sessiontag._take_counter(user_id uuid, model_id uuid, n bigint DEFAULT 1)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result bigint;
BEGIN
    INSERT INTO sessiontag.session_counters AS c (user_id, model_id, last_value)
    VALUES (_take_counter.user_id, _take_counter.model_id, _take_counter.n)
    ON CONFLICT ON CONSTRAINT session_counters_pkey DO UPDATE SET last_value = c.last_value + excluded.last_value
    RETURNING c.last_value INTO result;
    RETURN result;
END
$$;

-- Takes the next tag of (user_id, model_id). NULL, never an error, when an argument is
-- NULL or the model is unknown, not tracked or another user's private model, and for a
-- user-scoped caller (see 60_access.sql) when user_id is another user (only a missing
-- sessiontag.user_id raises, as a missing privilege does). The number belongs to
-- the caller's transaction: commit it with the conversation that carries the tag.
-- SECURITY DEFINER: it writes the counters, which no caller may write.
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
    WHERE id = generate_session_tag.model_id AND tracked
      AND (owner_id IS NULL OR owner_id = generate_session_tag.user_id);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    n := sessiontag._take_counter(generate_session_tag.user_id, m.id);
    RETURN ROW(sessiontag._format_tag(m.short_id, n), m.name, n, m.id, m.name)::sessiontag.session_tag;
END
$$;

-- n consecutive tags of (user_id, model_id) in one call. No rows when an argument is
-- NULL or the model is unknown or not tracked, or when generate_session_tag would
-- answer NULL to a user-scoped caller.
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
    WHERE id = generate_session_tags.model_id AND tracked
      AND (owner_id IS NULL OR owner_id = generate_session_tags.user_id);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    last := sessiontag._take_counter(generate_session_tags.user_id, m.id, generate_session_tags.n);
    RETURN QUERY
        SELECT sessiontag._format_tag(m.short_id, k), m.name, k, m.id, m.name
        FROM generate_series(last - generate_session_tags.n + 1, last) AS k;
END
$$;

-- Trigger on conversations: tags a new conversation of a tracked model, and checks
-- every tag written by a caller. A caller may give its own session_id (a manual tag);
-- one in the automatic form must have been issued by generate_session_tag(s) for this
-- user and model, so it can never collide with a tag handed out later. A tag, once
-- set, never changes. A conversation uses a shared model or its own user's. SECURITY
-- DEFINER: it writes the counters; a user-scoped caller may only write its own user's
-- conversations.
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
BEGIN
    PERFORM sessiontag._check_user(NEW.user_id);
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
        WHERE id = NEW.llm_model_id AND (owner_id IS NULL OR owner_id = NEW.user_id);
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
            -- A row whose key is taken is never stored: an INSERT ... ON CONFLICT skips it
            -- or updates the existing row, and a plain INSERT fails. Give the number back,
            -- or the counter would have a gap. Checked after the counter's row lock, so a
            -- concurrent creator of the same conversation (same model) has committed by
            -- then and its row is seen.
            IF EXISTS (SELECT FROM sessiontag.conversations c WHERE c.user_id = NEW.user_id AND c.id = NEW.id)
               OR EXISTS (SELECT FROM sessiontag.conversations c
                          WHERE c.user_id = NEW.user_id AND c.external_id = NEW.external_id) THEN
                UPDATE sessiontag.session_counters c SET last_value = c.last_value - 1
                WHERE c.user_id = NEW.user_id AND c.model_id = m.id;
                NEW.session_counter := NULL;
                RETURN NEW;
            END IF;
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

DROP TRIGGER _100_tag ON sessiontag.conversations;
CREATE TRIGGER _100_tag
    BEFORE INSERT OR UPDATE OF session_id, session_counter, llm_model_id ON sessiontag.conversations
    FOR EACH ROW EXECUTE FUNCTION sessiontag._conversations_tag();

-- Locks and returns one conversation by id (and user, when given); raises when unknown.
CREATE OR REPLACE FUNCTION sessiontag._lock_conversation(conversation_id uuid, user_id uuid DEFAULT NULL)
RETURNS sessiontag.conversations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result sessiontag.conversations;
BEGIN
    IF _lock_conversation.conversation_id IS NULL THEN
        RAISE EXCEPTION 'conversation_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO STRICT result FROM sessiontag.conversations c
    WHERE c.id = _lock_conversation.conversation_id
      AND (_lock_conversation.user_id IS NULL OR c.user_id = _lock_conversation.user_id)
    FOR UPDATE;
    RETURN result;
EXCEPTION
    WHEN no_data_found THEN
        RAISE EXCEPTION 'conversation_id % not found', _lock_conversation.conversation_id
            USING ERRCODE = 'no_data_found';
    WHEN too_many_rows THEN
        RAISE EXCEPTION 'conversation_id % belongs to several users; give user_id', _lock_conversation.conversation_id
            USING ERRCODE = 'cardinality_violation';
END
$$;

-- The first-message path: tags an untagged conversation with model_id (or its own
-- model) and returns the tag; returns the existing tag otherwise. Concurrent calls on
-- one conversation queue on its row lock, so they yield one tag and take one number.
-- NULL when the conversation has no tag and no tracked model to make one. SECURITY
-- DEFINER (it writes the counters and the tag): for a user-scoped caller another user's
-- conversation does not exist, and for everyone another user's private model.
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
                       AND (m.owner_id IS NULL OR m.owner_id = c.user_id)) THEN
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

-- '[GPT-4o #007]' for a tag; NULL for an unknown one. user_id picks among users who
-- hold the same tag text (each user numbers their own sessions).
CREATE OR REPLACE FUNCTION sessiontag.session_badge(session_id text, user_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sessiontag._badge(c.experiment_name, c.session_id, c.session_counter)
    FROM sessiontag.conversations c
    WHERE c.session_id = session_badge.session_id
      AND (session_badge.user_id IS NULL OR c.user_id = session_badge.user_id)
    ORDER BY c.created_at, c.user_id
    LIMIT 1
$$;

-- Trigger on conversations: when a conversation gets its tag, the traces recorded before
-- (while it had none) get it too, so every trace of a conversation carries its tag.
-- SECURITY DEFINER: nobody else writes llm_traces.session_tag.
CREATE OR REPLACE FUNCTION sessiontag._conversations_trace_tags()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE sessiontag.llm_traces t SET session_tag = NEW.session_id
    WHERE t.user_id = NEW.user_id AND t.conversation_id = NEW.id AND t.session_tag IS NULL;
    RETURN NULL;
END
$$;
DROP TRIGGER _200_trace_tags ON sessiontag.conversations;
CREATE TRIGGER _200_trace_tags
    AFTER UPDATE OF session_id ON sessiontag.conversations
    FOR EACH ROW WHEN (OLD.session_id IS NULL AND NEW.session_id IS NOT NULL)
    EXECUTE FUNCTION sessiontag._conversations_trace_tags();

REVOKE ALL ON FUNCTION sessiontag._take_counter(uuid, uuid, bigint) FROM PUBLIC;
-- 7 -> '007', 1000 -> '1000': at least 3 digits, never truncated.
CREATE FUNCTION sessiontag._pad_counter(counter bigint)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN CASE WHEN _pad_counter.counter < 1000
                THEN lpad(_pad_counter.counter::text, 3, '0')
                ELSE _pad_counter.counter::text END;
END
$$;
-- The user the calling role is confined to: NULL for an unrestricted caller (the owner,
-- a superuser or BYPASSRLS role, sessiontag_app, sessiontag_reader), the setting
-- sessiontag.user_id for a member of sessiontag_user; raises 42501 for a member of
-- sessiontag_user when the setting is missing. The calling role is the outer one (SET
-- ROLE's, else the session's): inside a SECURITY DEFINER function current_user is the
-- owner.
CREATE FUNCTION sessiontag._scoped_user()
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller text := current_setting('role');
    setting text;
BEGIN
    IF caller = 'none' THEN
        caller := session_user;
    END IF;
    -- pg_has_role is true for superusers, hence the second test.
    IF NOT pg_has_role(caller, 'sessiontag_user', 'USAGE')
       OR EXISTS (SELECT FROM pg_roles r WHERE r.rolname = caller AND (r.rolsuper OR r.rolbypassrls)) THEN
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
    RETURN setting::uuid;
END
$$;

DROP FUNCTION sessiontag._check_user(uuid);
-- Raises 42501 when a user-scoped caller names another user than its own (NULL is left
-- to the caller's own checks); returns _scoped_user().
CREATE FUNCTION sessiontag._check_user(user_id uuid)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._scoped_user();
BEGIN
    IF scoped IS NOT NULL AND _check_user.user_id <> scoped THEN
        RAISE EXCEPTION 'user_id % is not the user of this session (sessiontag.user_id)', _check_user.user_id
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'user_id';
    END IF;
    RETURN scoped;
END
$$;
CREATE OR REPLACE FUNCTION sessiontag._format_tag(short_id text, counter bigint)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN 'chat_model_' || _format_tag.short_id || '_' || sessiontag._pad_counter(_format_tag.counter);
END
$$;

-- '[GPT-4o #007]' for a numbered tag; '[name]' (or '[tag]') for a manual one.
CREATE OR REPLACE FUNCTION sessiontag._badge(experiment_name text, session_id text, counter bigint)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF _badge.counter IS NULL THEN
        RETURN '[' || coalesce(_badge.experiment_name, _badge.session_id) || ']';
    END IF;
    RETURN '[' || coalesce(_badge.experiment_name, 'session') || ' #' || sessiontag._pad_counter(_badge.counter) || ']';
END
$$;

-- Creates a conversation, tagged at creation when model_id names a tracked model.
CREATE OR REPLACE FUNCTION sessiontag.create_conversation(
    user_id uuid,
    model_id uuid DEFAULT NULL,
    title text DEFAULT NULL,
    id uuid DEFAULT NULL,
    analytics_enabled boolean DEFAULT true,
    external_id text DEFAULT NULL,
    session_id text DEFAULT NULL
)
RETURNS sessiontag.conversations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result sessiontag.conversations;
BEGIN
    IF create_conversation.user_id IS NULL THEN
        RAISE EXCEPTION 'user_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF create_conversation.analytics_enabled IS NULL THEN
        RAISE EXCEPTION 'analytics_enabled must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF length(create_conversation.title) > 1000 THEN
        RAISE EXCEPTION 'title is longer than 1000 characters' USING ERRCODE = 'string_data_right_truncation';
    END IF;
    IF create_conversation.external_id = '' OR length(create_conversation.external_id) > 200 THEN
        RAISE EXCEPTION 'external_id must be 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_conversation.session_id = '' OR length(create_conversation.session_id) > 200 THEN
        RAISE EXCEPTION 'session_id must be 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Friendly errors for the common mistakes; the constraints remain the guard.
    IF create_conversation.model_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m
                       WHERE m.id = create_conversation.model_id
                         AND (m.owner_id IS NULL OR m.owner_id = create_conversation.user_id)) THEN
        RAISE EXCEPTION 'model_id % is not a registered model', create_conversation.model_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF create_conversation.id IS NOT NULL AND EXISTS (
           SELECT FROM sessiontag.conversations c
           WHERE c.user_id = create_conversation.user_id AND c.id = create_conversation.id) THEN
        RAISE EXCEPTION 'conversation id % already exists for user %', create_conversation.id, create_conversation.user_id
            USING ERRCODE = 'unique_violation';
    END IF;
    IF create_conversation.external_id IS NOT NULL AND EXISTS (
           SELECT FROM sessiontag.conversations c
           WHERE c.user_id = create_conversation.user_id AND c.external_id = create_conversation.external_id) THEN
        RAISE EXCEPTION 'external_id % is already used by another conversation of user %',
            create_conversation.external_id, create_conversation.user_id USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO sessiontag.conversations AS c
        (id, user_id, external_id, title, llm_model_id, session_id, analytics_enabled)
    VALUES (coalesce(create_conversation.id, gen_random_uuid()), create_conversation.user_id,
            create_conversation.external_id, create_conversation.title, create_conversation.model_id,
            create_conversation.session_id, create_conversation.analytics_enabled)
    RETURNING c.* INTO result;
    RETURN result;
END
$$;

-- Stores a JSON array of finished or started spans (keys: record_trace's parameter
-- names; status running and no end_time for a started span) and returns how many of its
-- elements took effect: inserted a span, or ended a running one. All or nothing: on bad input it raises, naming the first bad
-- element and field ('spans[3].status: ...'), and stores nothing. Spans already stored
-- are not stored again (a finished one ends a stored running one); spans of
-- conversations with analytics off are skipped. Neither counts.
--
-- Set-based: one INSERT ... SELECT over the whole batch. Only when it inserted fewer
-- rows than the batch holds (untagged conversations, retries, tracking off) do the
-- tagging, a second insert and the completion run; only when it failed does the
-- element-by-element diagnosis run.
--
-- A user-scoped caller may only store spans of its own user_id: the first other one is
-- refused with 42501, naming it ('spans[3].user_id: ...').
CREATE OR REPLACE FUNCTION sessiontag.ingest_traces(spans jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._scoped_user();
    other bigint;
    n integer;
    stored integer;
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
    n := jsonb_array_length(ingest_traces.spans);
    IF n = 0 THEN
        RETURN 0;
    END IF;
    BEGIN
        IF scoped IS NOT NULL THEN
            -- (A user_id that is not a UUID fails the cast: the diagnosis below names it.)
            SELECT e.idx - 1 INTO other
            FROM jsonb_array_elements(ingest_traces.spans) WITH ORDINALITY AS e(elem, idx)
            WHERE (e.elem ->> 'user_id')::uuid <> scoped
            ORDER BY e.idx LIMIT 1;
            IF other IS NOT NULL THEN
                RAISE EXCEPTION 'spans[%].user_id: % is not the user of this session (sessiontag.user_id)', other,
                    ingest_traces.spans -> other::integer ->> 'user_id' USING ERRCODE = 'insufficient_privilege';
            END IF;
        END IF;
        stored := sessiontag._ingest_insert(ingest_traces.spans, false);
        IF stored < n THEN
            PERFORM sessiontag._ingest_tag(ingest_traces.spans);
            stored := stored + sessiontag._ingest_insert(ingest_traces.spans, true)
                             + sessiontag._ingest_complete(ingest_traces.spans);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                                err_detail = PG_EXCEPTION_DETAIL;
        -- Bad data (a cast, a constraint, a check above): name the first bad element.
        -- Anything else (a lock timeout, a deadlock, ...) goes to the caller as it is.
        IF left(err_state, 2) IN ('22', '23') OR err_state = 'P0002' THEN
            PERFORM sessiontag._ingest_diagnose(ingest_traces.spans);
            IF err_message NOT LIKE 'spans[%' THEN
                err_message := 'spans: ' || err_message;
            END IF;
        END IF;
        IF err_detail = '' THEN
            RAISE EXCEPTION USING MESSAGE = err_message, ERRCODE = err_state;
        END IF;
        RAISE EXCEPTION USING MESSAGE = err_message, ERRCODE = err_state, DETAIL = err_detail;
    END;
    RETURN stored;
END
$$;
REVOKE ALL ON FUNCTION sessiontag._pad_counter(bigint), sessiontag._scoped_user(), sessiontag._check_user(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sessiontag._pad_counter(bigint) TO sessiontag_app, sessiontag_user, sessiontag_reader;
REVOKE EXECUTE ON FUNCTION sessiontag._format_tag(text, bigint) FROM sessiontag_app, sessiontag_user, sessiontag_reader;
DROP FUNCTION sessiontag._handed_out(uuid, bigint, uuid);
DROP FUNCTION sessiontag._reserve_numbers(uuid, uuid, bigint);
DROP FUNCTION sessiontag._lock_numbers(uuid, uuid);
DROP FUNCTION sessiontag._tag_parts(text);
DROP INDEX sessiontag.idx_conversations_untagged;
DROP INDEX sessiontag.idx_session_counters_model;
DROP INDEX sessiontag.idx_conversations_number;
ALTER TABLE sessiontag.session_counters DROP COLUMN last_xact;
COMMENT ON TABLE sessiontag.session_counters IS 'Last session number taken per (user, model); written only by sessiontag functions';
