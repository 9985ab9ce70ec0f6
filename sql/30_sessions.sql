-- sessiontag: session tags and conversations.
--
-- A session tag is chat_model_{short_id}_{counter}: short_id names the model (see
-- 20_models.sql), counter numbers the user's sessions with that model from 1, padded to
-- at least 3 digits. Numbers come from sessiontag.session_counters inside the caller's
-- transaction, so they are gapless and unique among committed conversations.

CREATE TYPE sessiontag.session_tag AS (
    session_id      text,
    experiment_name text,
    counter         bigint,
    model_id        uuid,
    model_name      text
);

-- The helpers below are PL/pgSQL, not LANGUAGE sql: a SQL function that pins its
-- search_path cannot be inlined and is planned again in every transaction, which on the
-- hot path of tagging cost more than the rest of the work; PL/pgSQL caches its plans.

-- chat_model_3f9a1c_007: the number padded to at least 3 digits (7 -> 007), never
-- truncated (1000 -> 1000). The one place of the format: badges read the number off it.
-- Self-contained (every function call that pins search_path costs about as much as this
-- body, and tagging runs it for every conversation).
CREATE FUNCTION sessiontag._format_tag(short_id text, counter bigint)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN 'chat_model_' || _format_tag.short_id || '_'
           || CASE WHEN _format_tag.counter < 1000 THEN lpad(_format_tag.counter::text, 3, '0')
                   ELSE _format_tag.counter::text END;
END
$$;

-- '[GPT-4o #007]' for a numbered tag (the number as its tag writes it); '[name]' (or
-- '[tag]') for a manual one.
CREATE FUNCTION sessiontag._badge(experiment_name text, session_id text, counter bigint)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF _badge.counter IS NULL THEN
        RETURN '[' || coalesce(_badge.experiment_name, _badge.session_id) || ']';
    END IF;
    RETURN '[' || coalesce(_badge.experiment_name, 'session') || ' #'
           || right(_badge.session_id, -length(rtrim(_badge.session_id, '0123456789'))) || ']';
END
$$;

-- The parts of a tag in the automatic form: {short_id, number as text}; NULL for any
-- other text (a manual tag).
CREATE FUNCTION sessiontag._tag_parts(session_id text)
RETURNS text[]
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN regexp_match(_tag_parts.session_id, '^chat_model_([0-9a-f]{6,32})_([0-9]{1,18})$');
END
$$;

-- Locks (user_id, model_id) for the rest of the transaction and returns the highest
-- number in use: the greater of the counter's last_value (numbers handed out without a
-- conversation, or kept from deleted ones) and the key's highest conversation number.
-- The numbers after it are free; each is taken by storing it (on a conversation, or in
-- last_value), so whatever is rolled back, to a savepoint too, gives its numbers back.
-- Concurrent callers of the same key queue here, callers of other keys do not. The first
-- call of a transaction writes its mark on the counter row (which waits for the
-- transaction holding the key, and in REPEATABLE READ fails with 40001 after one that
-- committed); later calls only read the mark, so numbering N conversations in one
-- transaction rewrites the row once, not N times. O(log n): index probes only.
CREATE FUNCTION sessiontag._lock_numbers(user_id uuid, model_id uuid)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    reserved bigint;
    top bigint;
BEGIN
    -- The mark is written only when it is not this transaction's yet (the WHERE); a row
    -- ON CONFLICT finds is locked either way.
    INSERT INTO sessiontag.session_counters AS c (user_id, model_id, last_value, last_xact)
    VALUES (_lock_numbers.user_id, _lock_numbers.model_id, 0, pg_current_xact_id())
    ON CONFLICT ON CONSTRAINT session_counters_pkey DO UPDATE SET last_xact = excluded.last_xact
        WHERE c.last_xact IS DISTINCT FROM excluded.last_xact
    RETURNING c.last_value INTO reserved;
    IF reserved IS NULL THEN  -- held already: the mark was this transaction's
        SELECT c.last_value INTO reserved FROM sessiontag.session_counters c
        WHERE c.user_id = _lock_numbers.user_id AND c.model_id = _lock_numbers.model_id;
    END IF;
    -- Read after the lock: in READ COMMITTED this sees every number committed before it.
    -- (A query of its own: with max() alone, it is one probe of idx_conversations_number.)
    SELECT max(v.session_counter) INTO top FROM sessiontag.conversations v
    WHERE v.user_id = _lock_numbers.user_id AND v.llm_model_id = _lock_numbers.model_id;
    RETURN greatest(reserved, top, 0);
END
$$;

-- Hands out the next n numbers of (user_id, model_id) without a conversation: they are
-- kept in last_value (until the transaction rolls back), so no conversation takes them
-- later; returns the last one.
CREATE FUNCTION sessiontag._reserve_numbers(user_id uuid, model_id uuid, n bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last bigint := sessiontag._lock_numbers(_reserve_numbers.user_id, _reserve_numbers.model_id) + _reserve_numbers.n;
BEGIN
    UPDATE sessiontag.session_counters c SET last_value = last
    WHERE c.user_id = _reserve_numbers.user_id AND c.model_id = _reserve_numbers.model_id;
    RETURN last;
END
$$;

-- Takes the next tag of (user_id, model_id). NULL, never an error, when an argument is
-- NULL or the model is unknown, not tracked or another user's private model, and for a
-- user-scoped caller (see 60_access.sql) when user_id is another user (only a missing
-- sessiontag.user_id raises, as a missing privilege does). The number belongs to
-- the caller's transaction: commit it with the conversation that carries the tag.
-- SECURITY DEFINER: it writes the counters, which no caller may write.
CREATE FUNCTION sessiontag.generate_session_tag(user_id uuid, model_id uuid)
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
    scoped := sessiontag._check_user();
    IF generate_session_tag.user_id <> scoped THEN
        RETURN NULL;
    END IF;
    SELECT * INTO m FROM sessiontag.llm_models
    WHERE id = generate_session_tag.model_id AND tracked
      AND (owner_id IS NULL OR owner_id = generate_session_tag.user_id);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    n := sessiontag._reserve_numbers(generate_session_tag.user_id, m.id, 1);
    RETURN ROW(sessiontag._format_tag(m.short_id, n), m.name, n, m.id, m.name)::sessiontag.session_tag;
END
$$;

-- n consecutive tags of (user_id, model_id) in one call. No rows when an argument is
-- NULL or the model is unknown or not tracked, or when generate_session_tag would
-- answer NULL to a user-scoped caller.
CREATE FUNCTION sessiontag.generate_session_tags(user_id uuid, model_id uuid, n integer)
RETURNS SETOF sessiontag.session_tag
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    last bigint;
    scoped uuid := sessiontag._check_user();
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
    last := sessiontag._reserve_numbers(generate_session_tags.user_id, m.id, generate_session_tags.n);
    RETURN QUERY
        SELECT sessiontag._format_tag(m.short_id, k), m.name, k, m.id, m.name
        FROM generate_series(last - generate_session_tags.n + 1, last) AS k;
END
$$;

-- Whether the row version with this xmin was written by the calling transaction (or one
-- of its subtransactions): a row version a transaction can see whose writer is still in
-- progress is its own. The key's lock is proved this way rather than by comparing
-- last_xact with pg_current_xact_id(): on Citus the mark is taken on the coordinator and
-- the conversation triggers run on a worker, whose transaction id is another; the row
-- version, written on the worker in the same transaction, is the same proof on both.
CREATE FUNCTION sessiontag._written_by_this_transaction(version xid)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current bigint := pg_current_xact_id()::text::bigint;
    -- xid is 32 bits; xid8 adds the epoch: the current one, unless that puts the version
    -- more than 2^31 after the current transaction (a subtransaction's id is a little
    -- after its parent's): then it was written before the last wraparound.
    full_id bigint := ((current >> 32) << 32) + _written_by_this_transaction.version::text::bigint;
BEGIN
    IF full_id > current + 2147483648 THEN
        full_id := full_id - 4294967296;
    END IF;
    RETURN full_id >= 0 AND pg_xact_status(full_id::text::xid8) = 'in progress';
END
$$;

-- Trigger on conversations: numbers a new conversation of a tracked model, and checks
-- every tag written. A caller may give its own session_id (a manual tag); one in the
-- automatic form must have been handed out for this user and model (generate_session_tag)
-- and be unused, so it can never collide with a number taken later. sessiontag's own
-- functions number existing conversations (ensure_session_tag, the backfill) by writing
-- session_counter, which no caller has the privilege to write: accepted only under the
-- key's lock taken in this transaction (_lock_numbers), above its reserved numbers. A tag,
-- once set, never changes, nor does the user or model of a numbered conversation. A
-- conversation uses a shared model or its own user's. SECURITY DEFINER: it reads the
-- counters; a user-scoped caller may only write its own user's conversations.
CREATE FUNCTION sessiontag._conversations_tag()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m sessiontag.llm_models;
    parts text[];
    number bigint;
    reserved bigint;
    top bigint;
BEGIN
    PERFORM sessiontag._check_user(NEW.user_id);
    IF TG_OP = 'UPDATE' THEN
        IF OLD.session_id IS NOT NULL AND (NEW.session_id IS DISTINCT FROM OLD.session_id
                                           OR NEW.session_counter IS DISTINCT FROM OLD.session_counter) THEN
            RAISE EXCEPTION 'conversation % already has session tag %; a tag never changes', OLD.id, OLD.session_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF OLD.session_counter IS NOT NULL AND (NEW.llm_model_id IS DISTINCT FROM OLD.llm_model_id
                                                OR NEW.user_id IS DISTINCT FROM OLD.user_id) THEN
            RAISE EXCEPTION 'conversation % is session % of its user and model; they never change', OLD.id,
                OLD.session_id USING ERRCODE = 'invalid_parameter_value';
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
            -- sessiontag's own functions numbering a conversation under the key's lock.
            IF m.tracked AND EXISTS (SELECT FROM sessiontag.session_counters c
                                     WHERE c.user_id = NEW.user_id AND c.model_id = m.id
                                       AND sessiontag._written_by_this_transaction(c.xmin)
                                       AND c.last_value < NEW.session_counter) THEN
                NEW.session_id := sessiontag._format_tag(m.short_id, NEW.session_counter);
                NEW.experiment_name := m.name;
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'session_counter is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF TG_OP = 'INSERT' AND m.tracked THEN
            NEW.session_counter := sessiontag._lock_numbers(NEW.user_id, m.id) + 1;
            NEW.session_id := sessiontag._format_tag(m.short_id, NEW.session_counter);
            NEW.experiment_name := m.name;
        END IF;
        RETURN NEW;
    END IF;

    parts := sessiontag._tag_parts(NEW.session_id);
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
        number := parts[2]::bigint;
        -- Handed out: at most the key's highest number in use (reserved, or on a conversation).
        SELECT c.last_value INTO reserved FROM sessiontag.session_counters c
        WHERE c.user_id = NEW.user_id AND c.model_id = m.id;
        SELECT max(v.session_counter) INTO top FROM sessiontag.conversations v
        WHERE v.user_id = NEW.user_id AND v.llm_model_id = m.id;
        IF m.short_id IS DISTINCT FROM parts[1]
           OR number NOT BETWEEN 1 AND greatest(coalesce(reserved, 0), coalesce(top, 0))
           OR coalesce(NEW.session_counter, number) <> number
           OR NEW.session_id <> sessiontag._format_tag(m.short_id, number) THEN
            RAISE EXCEPTION 'session_id % has the form of an automatic tag but was not issued for this user and model', NEW.session_id
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Take it from generate_session_tag in the same transaction, or choose a tag of another form.';
        END IF;
        NEW.llm_model_id := m.id;
        NEW.session_counter := number;
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

CREATE TRIGGER _100_tag
    BEFORE INSERT OR UPDATE OF user_id, session_id, session_counter, llm_model_id ON sessiontag.conversations
    FOR EACH ROW EXECUTE FUNCTION sessiontag._conversations_tag();

-- Trigger on conversations: a deleted conversation's number stays taken. Numbers in use
-- are read off the conversations, so before the highest goes, last_value keeps it. The
-- first deleted row of a key raises last_value to the key's highest number, which the
-- key's other deleted rows then find already kept: deleting many conversations costs one
-- write of the counter, not one per row. SECURITY DEFINER: it writes the counters.
CREATE FUNCTION sessiontag._conversations_keep_numbers()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE sessiontag.session_counters c
    SET last_value = (SELECT max(v.session_counter) FROM sessiontag.conversations v
                      WHERE v.user_id = OLD.user_id AND v.llm_model_id = OLD.llm_model_id)
    WHERE c.user_id = OLD.user_id AND c.model_id = OLD.llm_model_id AND c.last_value < OLD.session_counter;
    RETURN OLD;
END
$$;

CREATE TRIGGER _300_keep_numbers
    BEFORE DELETE ON sessiontag.conversations
    FOR EACH ROW WHEN (OLD.session_counter IS NOT NULL)
    EXECUTE FUNCTION sessiontag._conversations_keep_numbers();

-- Creates a conversation, tagged at creation when model_id names a tracked model.
CREATE FUNCTION sessiontag.create_conversation(
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
    -- Friendly errors for the common mistakes; the constraints remain the guard. (Each
    -- query under its own IF: one that is not needed then costs nothing.)
    IF create_conversation.model_id IS NOT NULL THEN
        IF NOT EXISTS (SELECT FROM sessiontag.llm_models m
                       WHERE m.id = create_conversation.model_id
                         AND (m.owner_id IS NULL OR m.owner_id = create_conversation.user_id)) THEN
            RAISE EXCEPTION 'model_id % is not a registered model', create_conversation.model_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;
    IF create_conversation.id IS NOT NULL THEN
        IF EXISTS (SELECT FROM sessiontag.conversations c
                   WHERE c.user_id = create_conversation.user_id AND c.id = create_conversation.id) THEN
            RAISE EXCEPTION 'conversation id % already exists for user %', create_conversation.id,
                create_conversation.user_id USING ERRCODE = 'unique_violation';
        END IF;
    END IF;
    IF create_conversation.external_id IS NOT NULL THEN
        IF EXISTS (SELECT FROM sessiontag.conversations c
                   WHERE c.user_id = create_conversation.user_id AND c.external_id = create_conversation.external_id) THEN
            RAISE EXCEPTION 'external_id % is already used by another conversation of user %',
                create_conversation.external_id, create_conversation.user_id USING ERRCODE = 'unique_violation';
        END IF;
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

-- Locks and returns one conversation by id (and user, when given); raises when unknown.
-- Without a user the conversation's user is looked up first, so that the lock is always
-- taken by (user_id, id): on a database distributed by user_id that is a lock on one row
-- of one node.
CREATE FUNCTION sessiontag._lock_conversation(conversation_id uuid, user_id uuid DEFAULT NULL)
RETURNS sessiontag.conversations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    owner uuid := _lock_conversation.user_id;
    owners uuid[];
    result sessiontag.conversations;
BEGIN
    IF _lock_conversation.conversation_id IS NULL THEN
        RAISE EXCEPTION 'conversation_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF owner IS NULL THEN
        SELECT array_agg(c.user_id) INTO owners FROM sessiontag.conversations c
        WHERE c.id = _lock_conversation.conversation_id;
        IF cardinality(owners) > 1 THEN
            RAISE EXCEPTION 'conversation_id % belongs to several users; give user_id', _lock_conversation.conversation_id
                USING ERRCODE = 'cardinality_violation';
        END IF;
        owner := owners[1];
    END IF;
    SELECT * INTO result FROM sessiontag.conversations c
    WHERE c.user_id = owner AND c.id = _lock_conversation.conversation_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'conversation_id % not found', _lock_conversation.conversation_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN result;
END
$$;

-- The first-message path: tags an untagged conversation with model_id (or its own
-- model) and returns the tag; returns the existing tag otherwise. Concurrent calls on
-- one conversation queue on its row lock, so they yield one tag and take one number.
-- NULL when the conversation has no tag and no tracked model to make one. SECURITY
-- DEFINER (it writes the number, which the _100_tag trigger turns into the tag): for a
-- user-scoped caller another user's conversation does not exist, and for everyone
-- another user's private model. Costs the same whatever the transaction numbered before.
CREATE FUNCTION sessiontag.ensure_session_tag(conversation_id uuid, model_id uuid DEFAULT NULL, user_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._check_user(ensure_session_tag.user_id);
    c sessiontag.conversations := sessiontag._lock_conversation(ensure_session_tag.conversation_id,
                                                                coalesce(ensure_session_tag.user_id, scoped));
    model uuid;
    number bigint;
    tag text;
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
    SELECT m.id INTO model FROM sessiontag.llm_models m
    WHERE m.id = coalesce(ensure_session_tag.model_id, c.llm_model_id) AND m.tracked
      AND (m.owner_id IS NULL OR m.owner_id = c.user_id);
    IF model IS NULL THEN
        RETURN NULL;
    END IF;
    number := sessiontag._lock_numbers(c.user_id, model) + 1;
    UPDATE sessiontag.conversations u SET llm_model_id = model, session_counter = number
    WHERE u.user_id = c.user_id AND u.id = c.id
    RETURNING u.session_id INTO tag;
    RETURN tag;
END
$$;

-- Whether a number of model_id that no conversation holds was handed out (to user_id, or
-- to any user): such a number is one generate_session_tag reserved, or one a deleted
-- conversation kept, so it is at most its counter's last_value. A user-scoped caller
-- learns only of its own user's. SECURITY DEFINER: no caller may read the counters.
CREATE FUNCTION sessiontag._handed_out(model_id uuid, number bigint, user_id uuid DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scoped uuid := sessiontag._check_user();
BEGIN
    RETURN EXISTS (SELECT FROM sessiontag.session_counters c
                   WHERE c.model_id = _handed_out.model_id AND c.last_value >= _handed_out.number
                     AND (_handed_out.user_id IS NULL OR c.user_id = _handed_out.user_id)
                     AND (scoped IS NULL OR c.user_id = scoped));
END
$$;

-- '[GPT-4o #007]' for a tag; NULL for an unknown one. user_id picks among users who
-- hold the same tag text (each user numbers their own sessions). A tag in the automatic
-- form that no conversation holds (handed out by generate_session_tag, not used yet)
-- answers from its model's name and its number.
CREATE FUNCTION sessiontag.session_badge(session_id text, user_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    badge text;
    parts text[] := sessiontag._tag_parts(session_badge.session_id);
BEGIN
    SELECT sessiontag._badge(c.experiment_name, c.session_id, c.session_counter) INTO badge
    FROM sessiontag.conversations c
    WHERE c.session_id = session_badge.session_id
      AND (session_badge.user_id IS NULL OR c.user_id = session_badge.user_id)
    ORDER BY c.created_at, c.user_id
    LIMIT 1;
    IF badge IS NULL AND session_badge.session_id = sessiontag._format_tag(parts[1], parts[2]::bigint) THEN
        SELECT sessiontag._badge(m.name, session_badge.session_id, parts[2]::bigint) INTO badge
        FROM sessiontag.llm_models m
        WHERE m.short_id = parts[1] AND sessiontag._handed_out(m.id, parts[2]::bigint, session_badge.user_id);
    END IF;
    RETURN badge;
END
$$;

-- Turns trace recording on or off for one conversation; returns the new state.
CREATE FUNCTION sessiontag.set_analytics_tracking(conversation_id uuid, enabled boolean, user_id uuid DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c sessiontag.conversations;
BEGIN
    IF set_analytics_tracking.enabled IS NULL THEN
        RAISE EXCEPTION 'enabled must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    c := sessiontag._lock_conversation(set_analytics_tracking.conversation_id, set_analytics_tracking.user_id);
    UPDATE sessiontag.conversations u SET analytics_enabled = set_analytics_tracking.enabled
    WHERE u.user_id = c.user_id AND u.id = c.id;
    RETURN set_analytics_tracking.enabled;
END
$$;

-- Backfill: conversations that existed before sessiontag (or were created while their
-- model was not tracked, or by a plain INSERT before 0003_tagging) get their numbers.

-- The untagged conversations of tracked models, optionally of one user and one model:
-- what tag_untagged_conversations has left to number.
CREATE FUNCTION sessiontag.count_untagged_conversations(user_id uuid DEFAULT NULL, model_id uuid DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result bigint;
BEGIN
    SELECT count(*) INTO result
    FROM sessiontag.conversations c
    JOIN sessiontag.llm_models m ON m.id = c.llm_model_id AND m.tracked AND (m.owner_id IS NULL OR m.owner_id = c.user_id)
    WHERE c.session_id IS NULL
      AND (count_untagged_conversations.user_id IS NULL OR c.user_id = count_untagged_conversations.user_id)
      AND (count_untagged_conversations.model_id IS NULL OR c.llm_model_id = count_untagged_conversations.model_id);
    RETURN result;
END
$$;

-- Numbers one batch of untagged conversations of tracked models (optionally of one user
-- and one model) and returns how many it numbered; 0 when none are left. Each (user,
-- model) continues its counter, in creation order (created_at, then id). Call it until
-- it returns 0, committing after each call (`sessiontag backfill` does): a batch is
-- one transaction, so stopping between batches leaves every conversation either
-- numbered or untouched, and a later run goes on. Safe beside live traffic: the numbers
-- are taken under each key's lock like every other, so a concurrent creator and the
-- backfill never leave a gap or a duplicate. The batch is read without locks, then each
-- user's rows are locked by (user_id, id) and numbered (a row tagged meanwhile by the
-- application is left as it is); users and models are taken in order, so two backfills
-- cannot deadlock with each other. SECURITY DEFINER: it writes the numbers.
CREATE FUNCTION sessiontag.tag_untagged_conversations(
    user_id uuid DEFAULT NULL,
    model_id uuid DEFAULT NULL,
    batch_size integer DEFAULT 10000
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    owner record;
    key record;
    top bigint;
    numbered integer := 0;
    found_any boolean;
    done integer;
BEGIN
    PERFORM sessiontag._check_user(tag_untagged_conversations.user_id);
    IF tag_untagged_conversations.batch_size IS NULL OR tag_untagged_conversations.batch_size NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'batch_size must be between 1 and 1000000, got %',
            coalesce(tag_untagged_conversations.batch_size::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Rows the application tagged between our read and our lock are skipped; read again
    -- until a batch numbers something or nothing is left, so 0 always means done.
    WHILE numbered = 0 LOOP
        found_any := false;
        FOR owner IN
            SELECT b.user_id, array_agg(b.id) AS ids
            FROM (SELECT c.user_id, c.id
                  FROM sessiontag.conversations c
                  JOIN sessiontag.llm_models m ON m.id = c.llm_model_id AND m.tracked
                                                AND (m.owner_id IS NULL OR m.owner_id = c.user_id)
                  WHERE c.session_id IS NULL
                    AND (tag_untagged_conversations.user_id IS NULL OR c.user_id = tag_untagged_conversations.user_id)
                    AND (tag_untagged_conversations.model_id IS NULL
                         OR c.llm_model_id = tag_untagged_conversations.model_id)
                  ORDER BY c.user_id, c.llm_model_id, c.created_at, c.id
                  LIMIT tag_untagged_conversations.batch_size) b
            GROUP BY b.user_id
            ORDER BY b.user_id
        LOOP
            found_any := true;
            FOR key IN
                SELECT l.llm_model_id, array_agg(l.id ORDER BY l.created_at, l.id) AS ids
                FROM (SELECT c.llm_model_id, c.id, c.created_at FROM sessiontag.conversations c
                      WHERE c.user_id = owner.user_id AND c.id = ANY (owner.ids) AND c.session_id IS NULL
                      FOR UPDATE) l
                JOIN sessiontag.llm_models m ON m.id = l.llm_model_id AND m.tracked
                GROUP BY l.llm_model_id
                ORDER BY l.llm_model_id
            LOOP
                top := sessiontag._lock_numbers(owner.user_id, key.llm_model_id);
                WITH numbers AS (
                    SELECT x.id, top + x.n AS number FROM unnest(key.ids) WITH ORDINALITY AS x(id, n)
                ), tagged AS (
                    UPDATE sessiontag.conversations c SET session_counter = numbers.number
                    FROM numbers
                    WHERE c.user_id = owner.user_id AND c.id = numbers.id
                    RETURNING 1
                )
                SELECT count(*) INTO done FROM tagged;
                numbered := numbered + done;
            END LOOP;
        END LOOP;
        EXIT WHEN NOT found_any;  -- nothing left to read
    END LOOP;
    RETURN numbered;
END
$$;
