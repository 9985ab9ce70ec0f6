-- The demo's conversations begin when their first turn does (its turns span the past
-- week, but the rows were created just now), so time filters on sessions and on traces
-- agree. Needs UPDATE on conversations.created_at, which only the schema owner has.
UPDATE sessiontag.conversations c
SET created_at = f.first_start
FROM (
    SELECT t.user_id, t.conversation_id, min(t.start_time) AS first_start
    FROM sessiontag.llm_traces t
    WHERE t.conversation_id = ANY (%(conversation_ids)s)
    GROUP BY t.user_id, t.conversation_id
) f
WHERE c.user_id = f.user_id AND c.id = f.conversation_id
