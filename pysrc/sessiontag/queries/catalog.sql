-- The shape of schema sessiontag as one JSON document: what `sessiontag verify` compares
-- with the expected catalog, and what the tests compare between databases built from
-- sql/ and from migrations/. Column order, OIDs and owners are left out on purpose: two
-- databases that behave the same compare equal.
WITH rels AS (
    SELECT c.oid, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'sessiontag' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
),
acl AS (
    -- Privileges granted to others than the object's owner.
    SELECT a.objid, a.kind,
           jsonb_object_agg(a.grantee, a.privileges) AS grants
    FROM (
        SELECT x.objid, x.kind,
               CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(e.grantee) END AS grantee,
               string_agg(e.privilege_type, ',' ORDER BY e.privilege_type) AS privileges
        FROM (
            SELECT c.oid AS objid, 'rel' AS kind, c.relowner AS owner, c.relacl AS acl
            FROM pg_class c JOIN rels r ON r.oid = c.oid
            UNION ALL
            SELECT p.oid, 'proc', p.proowner, p.proacl
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'sessiontag'
            UNION ALL
            SELECT n.oid, 'schema', n.nspowner, n.nspacl
            FROM pg_namespace n WHERE n.nspname = 'sessiontag'
        ) x
        CROSS JOIN LATERAL aclexplode(x.acl) e
        WHERE e.grantee <> x.owner
        GROUP BY 1, 2, 3
    ) a
    GROUP BY 1, 2
),
colacl AS (
    SELECT att.attrelid, att.attname,
           jsonb_object_agg(g.grantee, g.privileges) AS grants
    FROM pg_attribute att
    JOIN rels r ON r.oid = att.attrelid
    CROSS JOIN LATERAL (
        SELECT CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(e.grantee) END AS grantee,
               string_agg(e.privilege_type, ',' ORDER BY e.privilege_type) AS privileges
        FROM aclexplode(att.attacl) e
        GROUP BY 1
    ) g
    WHERE att.attacl IS NOT NULL
    GROUP BY 1, 2
)
SELECT jsonb_build_object(
    'schema', jsonb_build_object(
        'grants', coalesce((SELECT grants FROM acl WHERE kind = 'schema'), '{}')
    ),
    'tables', coalesce((
        SELECT jsonb_object_agg(r.relname, jsonb_build_object(
            'kind', r.relkind,
            'row_security', r.relrowsecurity,
            'force_row_security', r.relforcerowsecurity,
            'grants', coalesce((SELECT grants FROM acl WHERE acl.objid = r.oid AND kind = 'rel'), '{}'),
            'columns', (
                SELECT jsonb_object_agg(a.attname, jsonb_build_object(
                    'type', format_type(a.atttypid, a.atttypmod),
                    'not_null', a.attnotnull,
                    'default', CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                    'generated', CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                    'grants', coalesce((SELECT grants FROM colacl ca WHERE ca.attrelid = a.attrelid AND ca.attname = a.attname), '{}')
                ))
                FROM pg_attribute a
                LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
            ),
            'constraints', coalesce((
                SELECT jsonb_object_agg(con.conname, pg_get_constraintdef(con.oid))
                FROM pg_constraint con WHERE con.conrelid = r.oid
            ), '{}')
        ))
        FROM rels r
    ), '{}'),
    'indexes', coalesce((
        SELECT jsonb_object_agg(i.relname, pg_get_indexdef(i.oid))
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN rels r ON r.oid = x.indrelid
    ), '{}'),
    'functions', coalesce((
        SELECT jsonb_object_agg(p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', jsonb_build_object(
            'kind', p.prokind,
            'arguments', pg_get_function_arguments(p.oid),
            'result', pg_get_function_result(p.oid),
            'language', l.lanname,
            'security_definer', p.prosecdef,
            'volatility', p.provolatile,
            'strict', p.proisstrict,
            'config', to_jsonb(p.proconfig),
            'source_md5', md5(p.prosrc),
            'grants', coalesce((SELECT grants FROM acl WHERE acl.objid = p.oid AND kind = 'proc'), '{}')
        ))
        FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        JOIN pg_language l ON l.oid = p.prolang
        WHERE n.nspname = 'sessiontag'
    ), '{}'),
    'triggers', coalesce((
        -- A disabled trigger (ALTER TABLE ... DISABLE TRIGGER) keeps its definition: say when it fires.
        SELECT jsonb_object_agg(r.relname || '.' || t.tgname, jsonb_build_object(
            'definition', pg_get_triggerdef(t.oid),
            'enabled', CASE t.tgenabled WHEN 'O' THEN 'yes' WHEN 'D' THEN 'no' WHEN 'R' THEN 'replica only'
                                        WHEN 'A' THEN 'always' END))
        FROM pg_trigger t JOIN rels r ON r.oid = t.tgrelid
        WHERE NOT t.tgisinternal
    ), '{}'),
    'policies', coalesce((
        SELECT jsonb_object_agg(r.relname || '.' || pol.polname, jsonb_build_object(
            'command', pol.polcmd,
            'permissive', pol.polpermissive,
            'roles', (SELECT jsonb_agg(CASE WHEN rid = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(rid) END ORDER BY 1)
                      FROM unnest(pol.polroles) rid),
            'using', pg_get_expr(pol.polqual, pol.polrelid),
            'with_check', pg_get_expr(pol.polwithcheck, pol.polrelid)
        ))
        FROM pg_policy pol JOIN rels r ON r.oid = pol.polrelid
    ), '{}'),
    'types', coalesce((
        SELECT jsonb_object_agg(t.typname, (
            SELECT jsonb_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
            FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ))
        FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        JOIN pg_class c ON c.oid = t.typrelid
        WHERE n.nspname = 'sessiontag' AND c.relkind = 'c'
    ), '{}')
) AS catalog
