-- sessiontag: models.
--
-- A model's short_id is the first 6 hex digits of its UUID, or the shortest longer
-- prefix no other model holds; it is fixed at registration, so the same model always
-- yields the same tags and two models never yield the same tag.

CREATE FUNCTION sessiontag._next_free_short_id(model_id uuid)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    hex text := replace(_next_free_short_id.model_id::text, '-', '');
BEGIN
    -- Serialize assignments, so two models sharing a prefix cannot both take it.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('sessiontag.llm_models.short_id'));
    FOR len IN 6..32 LOOP
        IF NOT EXISTS (SELECT FROM sessiontag.llm_models m WHERE m.short_id = left(hex, len)) THEN
            RETURN left(hex, len);
        END IF;
    END LOOP;
    RAISE EXCEPTION 'model id % is already registered', _next_free_short_id.model_id
        USING ERRCODE = 'unique_violation';
END
$$;

-- Trigger: assigns short_id on insert and keeps id and short_id fixed afterwards.
-- SECURITY DEFINER: _next_free_short_id is the owner's alone.
CREATE FUNCTION sessiontag._llm_models_short_id()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.id IS NULL THEN
            RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'not_null_violation';
        END IF;
        IF NEW.short_id IS NOT NULL THEN
            RAISE EXCEPTION 'short_id is assigned by sessiontag and cannot be given'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        NEW.short_id := sessiontag._next_free_short_id(NEW.id);
    ELSIF NEW.id IS DISTINCT FROM OLD.id OR NEW.short_id IS DISTINCT FROM OLD.short_id THEN
        RAISE EXCEPTION 'the id and short_id of a model never change (model %)', OLD.id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER _100_short_id
    BEFORE INSERT OR UPDATE OF id, short_id ON sessiontag.llm_models
    FOR EACH ROW EXECUTE FUNCTION sessiontag._llm_models_short_id();

-- Registers a model; registering again with the same (owner_id, model_key) returns the
-- existing id. model_key defaults to name.
CREATE FUNCTION sessiontag.register_model(
    name text,
    provider text DEFAULT NULL,
    model_key text DEFAULT NULL,
    owner_id uuid DEFAULT NULL,
    id uuid DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key text := coalesce(register_model.model_key, register_model.name);
    result uuid;
BEGIN
    IF register_model.name IS NULL THEN
        RAISE EXCEPTION 'name must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF btrim(register_model.name) = '' THEN
        RAISE EXCEPTION 'name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(register_model.name) > 200 THEN
        RAISE EXCEPTION 'name is longer than 200 characters' USING ERRCODE = 'string_data_right_truncation';
    END IF;
    IF btrim(key) = '' OR length(key) > 200 THEN
        RAISE EXCEPTION 'model_key must be 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF register_model.provider = '' THEN
        RAISE EXCEPTION 'provider must not be empty (NULL when unknown)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(register_model.provider) > 200 THEN
        RAISE EXCEPTION 'provider is longer than 200 characters' USING ERRCODE = 'string_data_right_truncation';
    END IF;

    INSERT INTO sessiontag.llm_models AS m (id, owner_id, name, provider, model_key)
    VALUES (coalesce(register_model.id, gen_random_uuid()), register_model.owner_id,
            register_model.name, register_model.provider, key)
    ON CONFLICT ON CONSTRAINT llm_models_owner_id_model_key_key DO NOTHING
    RETURNING m.id INTO result;

    IF result IS NULL THEN
        SELECT m.id INTO result
        FROM sessiontag.llm_models m
        WHERE m.model_key = key AND m.owner_id IS NOT DISTINCT FROM register_model.owner_id;
    END IF;
    RETURN result;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'id % is already registered for another model', register_model.id
        USING ERRCODE = 'unique_violation';
END
$$;

-- The owner's own model first, then a shared one; NULL when none. PL/pgSQL, like every
-- function with parameters that reads a table: Citus cannot plan a SQL function's
-- parameterized query.
CREATE FUNCTION sessiontag.model_id(model_key text, owner_id uuid DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT m.id
            FROM sessiontag.llm_models m
            WHERE m.model_key = model_id.model_key
              AND (m.owner_id = model_id.owner_id OR m.owner_id IS NULL)
            ORDER BY m.owner_id IS NULL
            LIMIT 1);
END
$$;

-- Turns tagging on or off for a model's new conversations; returns the new state.
CREATE FUNCTION sessiontag.set_model_tracking(model_id uuid, tracked boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result boolean;
BEGIN
    IF set_model_tracking.model_id IS NULL THEN
        RAISE EXCEPTION 'model_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF set_model_tracking.tracked IS NULL THEN
        RAISE EXCEPTION 'tracked must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE sessiontag.llm_models m
    SET tracked = set_model_tracking.tracked
    WHERE m.id = set_model_tracking.model_id
    RETURNING m.tracked INTO result;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model_id % is not a registered model', set_model_tracking.model_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN result;
END
$$;

-- The models a user can tag with (their own and the shared ones), or every model.
CREATE FUNCTION sessiontag.list_models(owner_id uuid DEFAULT NULL)
RETURNS SETOF sessiontag.llm_models
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT m.*
    FROM sessiontag.llm_models m
    WHERE list_models.owner_id IS NULL OR m.owner_id = list_models.owner_id OR m.owner_id IS NULL
    ORDER BY m.name, m.owner_id NULLS FIRST, m.id;
END
$$;
