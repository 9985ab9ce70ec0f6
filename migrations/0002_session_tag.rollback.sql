-- Keeps every trace's tag aside in sessiontag_archive.llm_traces_session_tag before the
-- column goes; applying 0002_session_tag again puts them back.

DO $$
BEGIN
    IF EXISTS (SELECT FROM sessiontag.llm_traces WHERE session_tag IS NOT NULL) THEN
        CREATE SCHEMA IF NOT EXISTS sessiontag_archive;
        COMMENT ON SCHEMA sessiontag_archive IS 'sessiontag data kept by rollbacks; applying the migrations again takes it back';
        -- Fails, changing nothing, if tags kept by an earlier rollback are still waiting here.
        CREATE TABLE sessiontag_archive.llm_traces_session_tag AS
            SELECT user_id, id, session_tag FROM sessiontag.llm_traces WHERE session_tag IS NOT NULL;
    END IF;
END
$$;

DROP INDEX sessiontag.idx_llm_traces_user_session;
DROP INDEX sessiontag.idx_llm_traces_session_tag;
ALTER TABLE sessiontag.llm_traces DROP COLUMN session_tag;
