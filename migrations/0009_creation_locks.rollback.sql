-- Undoes 0009_creation_locks: the bodies of 0008 again (a racing insert with another
-- model may again lose a number), and no lock table. No data is touched.

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
       AND NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.id = create_conversation.model_id) THEN
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

DROP TABLE sessiontag._creation_locks;
