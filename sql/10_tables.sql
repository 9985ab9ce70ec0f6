-- sessiontag: tables.
--
-- Every per-user table keys on (user_id, ...) and refers to another per-user table
-- through (user_id, ...), so the schema can be distributed by user_id (Citus) as it is.
-- llm_models is small reference data, shared by all users or owned by one.

CREATE SCHEMA sessiontag;
COMMENT ON SCHEMA sessiontag IS 'sessiontag: LLM chat traces tagged by session, per user and per model';

CREATE TABLE sessiontag.llm_models (
    id          uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    owner_id    uuid,
    name        text        NOT NULL CHECK (name <> '' AND length(name) <= 200),
    provider    text        CHECK (length(provider) <= 200),
    model_key   text        NOT NULL CHECK (model_key <> '' AND length(model_key) <= 200),
    tracked     boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Fixed at registration (see sessiontag._next_free_short_id): the first 6 hex digits
    -- of id, longer only when another model already holds that prefix.
    short_id    text        NOT NULL UNIQUE CHECK (short_id ~ '^[0-9a-f]{6,32}$'),
    -- A shared model (owner_id NULL) and an owner's own model may share a key;
    -- two shared models may not.
    CONSTRAINT llm_models_owner_id_model_key_key UNIQUE NULLS NOT DISTINCT (owner_id, model_key)
);
COMMENT ON TABLE sessiontag.llm_models IS 'Models whose conversations get session tags; owner_id NULL = shared by all users';

CREATE TABLE sessiontag.conversations (
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id           uuid        NOT NULL,
    external_id       text        CHECK (external_id <> '' AND length(external_id) <= 200),
    title             text        CHECK (length(title) <= 1000),
    llm_model_id      uuid        REFERENCES sessiontag.llm_models (id),
    session_id        text        CHECK (session_id <> '' AND length(session_id) <= 200),
    experiment_name   text        CHECK (length(experiment_name) <= 200),
    analytics_enabled boolean     NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- Number of the session tag within (user_id, llm_model_id); NULL for manual tags.
    session_counter   bigint      CHECK (session_counter > 0),
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, external_id),
    UNIQUE (user_id, session_id)
);
COMMENT ON TABLE sessiontag.conversations IS 'Chat conversations; session_id is the session tag';
-- ensure_session_tag and friends find a conversation by its id alone.
CREATE INDEX idx_conversations_id ON sessiontag.conversations (id);
-- session_badge finds a tag without knowing its user.
CREATE INDEX idx_conversations_session_id ON sessiontag.conversations (session_id);
-- The highest number of a (user, model), for the next one; unique, so no number is ever
-- on two conversations of one key.
CREATE UNIQUE INDEX idx_conversations_number ON sessiontag.conversations (user_id, llm_model_id, session_counter)
    WHERE session_counter IS NOT NULL;
-- The untagged conversations of a (user, model) in creation order, for the backfill.
CREATE INDEX idx_conversations_untagged ON sessiontag.conversations (user_id, llm_model_id, created_at, id)
    WHERE session_id IS NULL;

CREATE TABLE sessiontag.llm_traces (
    id             uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id        uuid        NOT NULL,
    trace_id       text        NOT NULL CHECK (trace_id <> '' AND length(trace_id) <= 128),
    span_id        text        NOT NULL CHECK (span_id <> '' AND length(span_id) <= 128),
    parent_span_id text        CHECK (parent_span_id <> '' AND length(parent_span_id) <= 128),
    conversation_id uuid,
    message_id     text        CHECK (length(message_id) <= 200),
    span_name      text        NOT NULL CHECK (span_name <> '' AND length(span_name) <= 200),
    operation_type text        NOT NULL DEFAULT 'llm_call' CHECK (operation_type <> '' AND length(operation_type) <= 100),
    model_id       uuid,
    model_name     text        CHECK (length(model_name) <= 200),
    model_provider text        CHECK (length(model_provider) <= 200),
    start_time     timestamptz NOT NULL DEFAULT now(),
    end_time       timestamptz,
    -- Derived, never taken from input.
    duration_ms    double precision GENERATED ALWAYS AS (extract(epoch FROM end_time - start_time) * 1000) STORED,
    status         text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'success', 'error', 'cancelled')),
    input_tokens   integer     CHECK (input_tokens >= 0),
    output_tokens  integer     CHECK (output_tokens >= 0),
    cost_usd       numeric(18, 8) CHECK (cost_usd >= 0),
    error_message  text,
    input_data     jsonb,
    output_data    jsonb,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    session_tag    text,
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, trace_id, span_id),
    -- A trace's conversation is the same user's. Deleting a conversation keeps its
    -- traces, with conversation_id NULL: the _400_keep_traces trigger (40_traces.sql) does
    -- that, since Citus refuses ON DELETE SET NULL on a key that includes user_id.
    FOREIGN KEY (user_id, conversation_id) REFERENCES sessiontag.conversations (user_id, id),
    CHECK (end_time >= start_time)
);
COMMENT ON TABLE sessiontag.llm_traces IS 'One row per span of an LLM call; session_tag is the conversation''s tag';
-- By tag, newest first (see 50_search.sql for the other ordered scans).
CREATE INDEX idx_llm_traces_session_tag ON sessiontag.llm_traces (session_tag, start_time, user_id, id);
CREATE INDEX idx_llm_traces_user_session ON sessiontag.llm_traces (user_id, session_tag);
CREATE INDEX idx_llm_traces_conversation ON sessiontag.llm_traces (user_id, conversation_id);

-- One row per (user, model) that has numbered sessions: the key's lock, and the numbers
-- that no conversation holds. The next number is one more than the greater of
-- last_value and the highest number on the key's conversations (found through
-- idx_conversations_number, O(log n)), so a conversation that is never stored (a
-- rollback, a savepoint rolled back, a row ON CONFLICT skips) takes no number, and a
-- transaction numbering many conversations never rewrites this row once per number.
-- last_value keeps numbers handed out without a conversation (generate_session_tag) and
-- those of deleted conversations (trigger _300_keep_numbers), so none is used twice.
-- last_xact marks the transaction that holds the key: the first take of a transaction
-- writes it (locking the row until the transaction ends, so callers of one key queue and
-- callers of other keys do not); later takes of the same transaction see their mark.
CREATE TABLE sessiontag.session_counters (
    user_id    uuid   NOT NULL,
    model_id   uuid   NOT NULL REFERENCES sessiontag.llm_models (id),
    last_value bigint NOT NULL CHECK (last_value >= 0),
    last_xact  xid8,
    PRIMARY KEY (user_id, model_id)
);
-- A tag handed out but not used yet, for session_badge: the counters of a model by number.
CREATE INDEX idx_session_counters_model ON sessiontag.session_counters (model_id, last_value);
COMMENT ON TABLE sessiontag.session_counters IS 'Per (user, model): the lock of its numbering and the numbers no conversation holds; written only by sessiontag functions';
