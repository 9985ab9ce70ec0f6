-- Never drops a trace: tables that hold rows move to schema sessiontag_archive, where
-- applying 0001_base_tables again finds them. Empty tables are dropped.

DO $$
BEGIN
    IF EXISTS (SELECT FROM sessiontag.llm_traces) OR EXISTS (SELECT FROM sessiontag.conversations)
       OR EXISTS (SELECT FROM sessiontag.llm_models) THEN
        CREATE SCHEMA IF NOT EXISTS sessiontag_archive;
        COMMENT ON SCHEMA sessiontag_archive IS 'sessiontag data kept by rollbacks; applying the migrations again takes it back';
        -- Fails, leaving everything in place, if an earlier rollback already kept tables here.
        ALTER TABLE sessiontag.llm_traces SET SCHEMA sessiontag_archive;
        ALTER TABLE sessiontag.conversations SET SCHEMA sessiontag_archive;
        ALTER TABLE sessiontag.llm_models SET SCHEMA sessiontag_archive;
    ELSE
        DROP TABLE sessiontag.llm_traces, sessiontag.conversations, sessiontag.llm_models;
    END IF;
END
$$;

-- Without CASCADE: anything else left in the schema stops the rollback instead of being lost.
DROP SCHEMA sessiontag;
