-- Drops what 0004_traces added: the trace functions, the trigger that gives a newly
-- tagged conversation's traces its tag, and their type. No table or row is touched: every
-- trace stays, with the tag it carries.

DROP TRIGGER _200_trace_tags ON sessiontag.conversations;
DROP FUNCTION sessiontag._conversations_trace_tags();
DROP FUNCTION sessiontag.ingest_traces(jsonb);
DROP FUNCTION sessiontag._ingest_diagnose(jsonb);
DROP FUNCTION sessiontag._element_problem(jsonb);
DROP FUNCTION sessiontag._ingest_complete(jsonb);
DROP FUNCTION sessiontag._ingest_tag(jsonb);
DROP FUNCTION sessiontag._ingest_insert(jsonb, boolean);
DROP FUNCTION sessiontag._invalid_span(bigint);
DROP FUNCTION sessiontag.record_trace(uuid, text, text, text, text, uuid, text, uuid, text, text, text, jsonb, jsonb,
                                      timestamptz, text, jsonb, integer, integer, numeric, text, timestamptz, text);
DROP FUNCTION sessiontag.end_trace(uuid, text, text, text, jsonb, integer, integer, numeric, text, timestamptz);
DROP FUNCTION sessiontag.start_trace(uuid, text, text, text, text, uuid, text, uuid, text, text, text, jsonb, jsonb,
                                     timestamptz, text);
DROP FUNCTION sessiontag._record_span(boolean, uuid, text, text, text, text, uuid, text, uuid, text, text, text, jsonb,
                                      jsonb, timestamptz, text, jsonb, integer, integer, numeric, text, timestamptz, text);
DROP FUNCTION sessiontag._finish_span(uuid, text, text, text, jsonb, integer, integer, numeric, text, timestamptz);
DROP FUNCTION sessiontag._refs_problem(uuid, uuid, uuid, text);
DROP FUNCTION sessiontag._end_problem(text, integer, integer, numeric, timestamptz, timestamptz, boolean);
DROP FUNCTION sessiontag._start_problem(uuid, text, text, text, text, text, text, text, text, jsonb, timestamptz, text);
DROP FUNCTION sessiontag._text_problem(text, text, integer, boolean);
DROP FUNCTION sessiontag._id_problem(text, text, boolean);
DROP FUNCTION sessiontag._span_fields();
DROP FUNCTION sessiontag._raise(sessiontag._problem, text);
DROP TYPE sessiontag._problem;
