-- The session tag on every trace, with the indexes that search by it. Applied again
-- after a rollback, it puts back the tags kept in sessiontag_archive.
-- depends: 0001_base_tables

ALTER TABLE sessiontag.llm_traces ADD COLUMN session_tag text;

DO $$
BEGIN
    IF to_regclass('sessiontag_archive.llm_traces_session_tag') IS NOT NULL THEN
        UPDATE sessiontag.llm_traces t
        SET session_tag = a.session_tag
        FROM sessiontag_archive.llm_traces_session_tag a
        WHERE t.user_id = a.user_id AND t.id = a.id;
        DROP TABLE sessiontag_archive.llm_traces_session_tag;
        IF NOT EXISTS (SELECT FROM pg_class WHERE relnamespace = to_regnamespace('sessiontag_archive')) THEN
            DROP SCHEMA sessiontag_archive;
        END IF;
    END IF;
END
$$;

CREATE INDEX idx_llm_traces_session_tag ON sessiontag.llm_traces (session_tag);
CREATE INDEX idx_llm_traces_user_session ON sessiontag.llm_traces (user_id, session_tag);
