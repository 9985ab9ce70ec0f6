-- Base tables: llm_models, conversations and llm_traces as they stood before session
-- tagging. Applied again after a rollback, it takes the kept tables (and their rows)
-- back from schema sessiontag_archive.
-- depends:

CREATE SCHEMA sessiontag;
COMMENT ON SCHEMA sessiontag IS 'sessiontag: LLM chat traces tagged by session, per user and per model';

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['llm_models', 'conversations', 'llm_traces'] LOOP
        IF to_regclass(format('sessiontag_archive.%I', t)) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE sessiontag_archive.%I SET SCHEMA sessiontag', t);
        END IF;
    END LOOP;
END
$$;

CREATE TABLE IF NOT EXISTS sessiontag.llm_models (
    id          uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    owner_id    uuid,
    name        text        NOT NULL CHECK (name <> '' AND length(name) <= 200),
    provider    text        CHECK (length(provider) <= 200),
    model_key   text        NOT NULL CHECK (model_key <> '' AND length(model_key) <= 200),
    tracked     boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT llm_models_owner_id_model_key_key UNIQUE NULLS NOT DISTINCT (owner_id, model_key)
);
COMMENT ON TABLE sessiontag.llm_models IS 'Models whose conversations get session tags; owner_id NULL = shared by all users';

CREATE TABLE IF NOT EXISTS sessiontag.conversations (
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_id           uuid        NOT NULL,
    external_id       text        CHECK (external_id <> '' AND length(external_id) <= 200),
    title             text        CHECK (length(title) <= 1000),
    llm_model_id      uuid        REFERENCES sessiontag.llm_models (id),
    session_id        text        CHECK (session_id <> '' AND length(session_id) <= 200),
    experiment_name   text        CHECK (length(experiment_name) <= 200),
    analytics_enabled boolean     NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, external_id),
    UNIQUE (user_id, session_id)
);
COMMENT ON TABLE sessiontag.conversations IS 'Chat conversations; session_id is the session tag';
CREATE INDEX IF NOT EXISTS idx_conversations_id ON sessiontag.conversations (id);
CREATE INDEX IF NOT EXISTS idx_conversations_session_id ON sessiontag.conversations (session_id);

CREATE TABLE IF NOT EXISTS sessiontag.llm_traces (
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
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, trace_id, span_id),
    FOREIGN KEY (user_id, conversation_id) REFERENCES sessiontag.conversations (user_id, id)
        ON DELETE SET NULL (conversation_id),
    CHECK (end_time >= start_time)
);
COMMENT ON TABLE sessiontag.llm_traces IS 'One row per span of an LLM call; session_tag is the conversation''s tag';
CREATE INDEX IF NOT EXISTS idx_llm_traces_conversation ON sessiontag.llm_traces (user_id, conversation_id);

DO $$
BEGIN
    IF to_regnamespace('sessiontag_archive') IS NOT NULL
       AND NOT EXISTS (SELECT FROM pg_class WHERE relnamespace = to_regnamespace('sessiontag_archive')) THEN
        DROP SCHEMA sessiontag_archive;
    END IF;
END
$$;
