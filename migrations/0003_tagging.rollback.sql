-- Keeps the models' short ids, the conversations' session numbers and the counters in
-- sessiontag_archive before they go; applying 0003_tagging again puts them back, so
-- every model keeps its short id and numbering continues where it stopped.

DO $$
BEGIN
    CREATE SCHEMA IF NOT EXISTS sessiontag_archive;
    COMMENT ON SCHEMA sessiontag_archive IS 'sessiontag data kept by rollbacks; applying the migrations again takes it back';
    -- Each fails, changing nothing, if an earlier rollback's copy is still waiting here.
    CREATE TABLE sessiontag_archive.llm_models_short_id AS
        SELECT id, short_id FROM sessiontag.llm_models;
    CREATE TABLE sessiontag_archive.conversations_session_counter AS
        SELECT user_id, id, session_counter FROM sessiontag.conversations WHERE session_counter IS NOT NULL;
    ALTER TABLE sessiontag.session_counters SET SCHEMA sessiontag_archive;
    IF NOT EXISTS (SELECT FROM sessiontag_archive.llm_models_short_id)
       AND NOT EXISTS (SELECT FROM sessiontag_archive.conversations_session_counter)
       AND NOT EXISTS (SELECT FROM sessiontag_archive.session_counters) THEN
        DROP TABLE sessiontag_archive.llm_models_short_id, sessiontag_archive.conversations_session_counter,
                   sessiontag_archive.session_counters;
        IF NOT EXISTS (SELECT FROM pg_class WHERE relnamespace = to_regnamespace('sessiontag_archive')) THEN
            DROP SCHEMA sessiontag_archive;
        END IF;
    END IF;
END
$$;

DROP FUNCTION sessiontag.set_analytics_tracking(uuid, boolean, uuid);
DROP FUNCTION sessiontag.session_badge(text, uuid);
DROP FUNCTION sessiontag.ensure_session_tag(uuid, uuid, uuid);
DROP FUNCTION sessiontag._lock_conversation(uuid, uuid);
DROP FUNCTION sessiontag.create_conversation(uuid, uuid, text, uuid, boolean, text, text);
DROP TRIGGER _100_tag ON sessiontag.conversations;
DROP FUNCTION sessiontag._conversations_tag();
DROP FUNCTION sessiontag.generate_session_tags(uuid, uuid, integer);
DROP FUNCTION sessiontag.generate_session_tag(uuid, uuid);
DROP FUNCTION sessiontag._take_counter(uuid, uuid, bigint);
DROP FUNCTION sessiontag._format_tag(text, bigint);
DROP FUNCTION sessiontag._badge(text, text, bigint);
DROP FUNCTION sessiontag._pad_counter(bigint);
DROP TYPE sessiontag.session_tag;
DROP FUNCTION sessiontag.list_models(uuid);
DROP FUNCTION sessiontag.set_model_tracking(uuid, boolean);
DROP FUNCTION sessiontag.model_id(text, uuid);
DROP FUNCTION sessiontag.register_model(text, text, text, uuid, uuid);
DROP TRIGGER _100_short_id ON sessiontag.llm_models;
DROP FUNCTION sessiontag._llm_models_short_id();
DROP FUNCTION sessiontag._next_free_short_id(uuid);
ALTER TABLE sessiontag.conversations DROP COLUMN session_counter;
ALTER TABLE sessiontag.llm_models DROP COLUMN short_id;
