-- Drops the search functions and indexes; no data is touched.

DROP FUNCTION sessiontag.compare_models(uuid, uuid[], timestamptz, timestamptz);
DROP FUNCTION sessiontag.session_summary(text, uuid);
DROP FUNCTION sessiontag.list_sessions(uuid, uuid, timestamptz, timestamptz, text, integer);
DROP FUNCTION sessiontag._summarize(sessiontag.conversations);
DROP TYPE sessiontag.session_summary;
DROP FUNCTION sessiontag.get_trace(uuid, text);
DROP FUNCTION sessiontag.list_traces(uuid, text, uuid, text, text, text, text, timestamptz, timestamptz, text, boolean, text, integer);
DROP TYPE sessiontag.trace_span;
DROP TYPE sessiontag.trace_listing;
DROP FUNCTION sessiontag._check_range(timestamptz, timestamptz);
DROP FUNCTION sessiontag._check_page_size(integer);
DROP FUNCTION sessiontag._decode_cursor(text, text);
DROP FUNCTION sessiontag._encode_cursor(timestamptz, uuid, uuid);
DROP INDEX sessiontag.idx_conversations_user_created;
DROP INDEX sessiontag.idx_conversations_created;
DROP INDEX sessiontag.idx_llm_traces_user_start;
DROP INDEX sessiontag.idx_llm_traces_start;
DROP INDEX sessiontag.idx_llm_traces_session_tag;
CREATE INDEX idx_llm_traces_session_tag ON sessiontag.llm_traces (session_tag);
