-- londiste-rs: PgQ's producer triggers, pgq.logutriga, pgq.sqltriga and
-- pgq.jsontriga, in PL/pgSQL (part of the pgq component).
--
-- Applications that produce events with these triggers keep working on our
-- schema: same arguments, same event formats, events written through
-- pgq.insert_event (7 arguments) as PgQ's own triggers do. londiste itself does
-- not use them (its statement-level capture triggers are in capture.sql).
--
-- CREATE TRIGGER ... FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('queue', args...)
--   SKIP              (BEFORE trigger) write the event, skip the change itself
--   backup            UPDATE: the old row goes to ev_extra2 (urlencoded; JSON for jsontriga)
--   deny              refuse every change, naming table, queue and operation
--   ignore=c1,c2      leave these columns out; an UPDATE that changed only them writes no event
--   pkey=c1,c2        the key columns, instead of the table's primary key
--   when=EXPR         write the event only where EXPR (on the row) is true
--   ev_type=EXPR, ev_data=EXPR, ev_extra1..4=EXPR
--                     the event field is EXPR, evaluated on the row
-- Columns named _pgq_ev_type, _pgq_ev_data, _pgq_ev_extra1..4 are not data:
-- their value is the event field's (an argument still wins). TRUNCATE triggers
-- (FOR EACH STATEMENT) write one 'R' event. In session_replication_role 'local'
-- the triggers do nothing; in 'replica' the server does not fire them.
--
-- Event formats (ev_extra1 is always schema.table, unquoted):
--   logutriga  ev_type 'I:pk1,pk2' / 'U:..' / 'D:..' / 'R', ev_data the row
--              urlencoded (col=val&col2&...: a NULL has no '='), values as
--              the type's output (booleans t/f)
--   sqltriga   ev_type 'I' / 'U' / 'D' / 'R', ev_data an SQL fragment:
--              (a,b) values ('1',null) | a='2' where pk='1' | pk='1'
--   jsontriga  ev_type {"op":"INSERT","table":["schema","table"],"pkey":["id"]},
--              ev_data {"col":value,...}: integers, booleans, dates and
--              timestamps as JSON values, every other type as a JSON string
-- Primary key changes are refused ('primary key update not allowed'), as are
-- UPDATE and DELETE on a table without a key.

-- URL encoding as PgQ writes it: unreserved characters stay, a space becomes
-- '+', every other byte (UTF-8) %xx in lower case.
CREATE OR REPLACE FUNCTION pgq._urlencode(val text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
-- (PL/pgSQL, not SQL: its plans are kept for the session, where an SQL
-- function's body would be planned again in every trigger's query.)
DECLARE
    res text;
BEGIN
    IF val ~ '^[-_.A-Za-z0-9]*$' THEN
        RETURN val;
    END IF;
    SELECT coalesce(string_agg(m.p[1] || replace(regexp_replace(encode(convert_to(m.p[2], 'UTF8'), 'hex'),
                                                                '(..)', '%\1', 'g'), '%20', '+'),
                               '' ORDER BY m.i), '')
      INTO res
      FROM regexp_matches(val, '([-_.A-Za-z0-9]*)([^-_.A-Za-z0-9]*)', 'g') WITH ORDINALITY AS m(p, i);
    RETURN res;
END $$;

-- Everything about one firing that does not depend on the row's values:
-- checks the arguments and the table, and returns the query that renders the
-- event from the row ($1: NEW, or OLD for DELETE; $2: OLD for UPDATE, else
-- the same as $1), or NULL when no event is to be written. The query returns
-- one row: (ev_type, ev_data, ev_extra1..4, emit, pk_changed).
CREATE OR REPLACE FUNCTION pgq._producer_prepare(i_fmt text, i_relid oid, i_schema text, i_table text,
    i_op text, i_when text, i_level text, i_args text[],
    OUT queue_name text, OUT skip boolean, OUT sql text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tname text := i_schema || '.' || i_table;
    backup boolean := false;
    deny boolean := false;
    ignore_list text[] := '{}';
    pkey_list text[];
    overrides text[] := '{}';
    when_expr text;
    arg text;
    kv text[];
    col record;
    rv text;
    ov text;
    fld text[] := ARRAY[NULL, NULL, quote_literal(tname), NULL, NULL, NULL];  -- type, data, extra1..4
    fields constant text[] := ARRAY['ev_type', 'ev_data', 'ev_extra1', 'ev_extra2', 'ev_extra3', 'ev_extra4'];
    data_n text[] := '{}';   -- per column: rendered from the main row
    data_o text[] := '{}';   -- per column: rendered from the old row (backup)
    ins_cols text[] := '{}';
    set_parts text[] := '{}';
    key_parts text[] := '{}';
    first_key text;
    data_changed text[] := '{}';
    ign_changed text[] := '{}';
    key_changed text[] := '{}';
    changed text;
    part text;
    seen text[] := '{}';
    emit text := 'true';
    ev_type text;
    ev_data text;
    i int4;
BEGIN
    skip := false;
    IF i_args IS NULL OR cardinality(i_args) < 1 THEN
        RAISE EXCEPTION 'pgq trigger must have destination queue as argument';
    END IF;
    IF i_op <> 'TRUNCATE' AND i_level <> 'ROW' THEN
        RAISE EXCEPTION 'pgq Ins/Upd/Del trigger must be fired FOR EACH ROW';
    END IF;
    queue_name := i_args[array_lower(i_args, 1)];
    -- 'local': the change is not to be replicated; the trigger steps aside.
    IF current_setting('session_replication_role') = 'local' THEN
        RETURN;
    END IF;
    FOR i IN array_lower(i_args, 1) + 1 .. array_upper(i_args, 1) LOOP
        arg := i_args[i];
        IF arg IN ('SKIP', 'skip') THEN
            skip := true;
        ELSIF arg = 'backup' THEN
            backup := true;
        ELSIF arg = 'deny' THEN
            deny := true;
        ELSE
            kv := regexp_match(arg, '^(pkey|ignore|when|ev_type|ev_data|ev_extra[1-4])=(.*)$');
            IF kv IS NULL THEN
                RAISE EXCEPTION 'bad param to pgq trigger: %', arg;
            ELSIF kv[1] = 'pkey' THEN
                pkey_list := string_to_array(kv[2], ',');
            ELSIF kv[1] = 'ignore' THEN
                ignore_list := string_to_array(kv[2], ',');
            ELSIF kv[1] = 'when' THEN
                when_expr := kv[2];
            ELSE
                overrides := overrides || ARRAY[kv[1], kv[2]];
            END IF;
        END IF;
    END LOOP;
    IF i_op = 'TRUNCATE' THEN
        IF cardinality(ignore_list) > 0 THEN
            RAISE EXCEPTION 'Column ignore does not make sense for truncate trigger';
        ELSIF pkey_list IS NOT NULL THEN
            RAISE EXCEPTION 'Custom pkey_list does not make sense for truncate trigger';
        ELSIF backup THEN
            RAISE EXCEPTION 'Backup does not make sense for truncate trigger';
        END IF;
    END IF;
    IF pkey_list IS NULL THEN
        -- The primary key in key order (static SQL: a plan kept for the session).
        SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}') INTO pkey_list
          FROM pg_index x
          CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indrelid = i_relid AND x.indisprimary;
    END IF;
    IF i_op IN ('UPDATE', 'DELETE') AND cardinality(pkey_list) = 0 THEN
        RAISE EXCEPTION 'Update/Delete on table without pkey';
    END IF;
    IF skip AND i_when = 'AFTER' THEN
        RAISE EXCEPTION 'SKIP does not work in AFTER trigger.';
    END IF;
    IF deny THEN
        RAISE EXCEPTION 'Table ''%'' to queue ''%'': change not allowed (%)', tname, queue_name, i_op;
    END IF;

    IF i_fmt = 'json' THEN
        ev_type := '{"op":' || to_json(i_op)::text || ',"table":[' || to_json(i_schema)::text || ','
                   || to_json(i_table)::text || '],"pkey":['
                   || coalesce((SELECT string_agg(to_json(k)::text, ',' ORDER BY o)
                                  FROM unnest(pkey_list) WITH ORDINALITY AS u(k, o)), '') || ']}';
    ELSIF i_fmt = 'urlenc' THEN
        ev_type := CASE WHEN i_op = 'TRUNCATE' THEN 'R' ELSE left(i_op, 1) || ':' || array_to_string(pkey_list, ',') END;
    ELSE
        ev_type := CASE WHEN i_op = 'TRUNCATE' THEN 'R' ELSE left(i_op, 1) END;
    END IF;
    fld[1] := quote_literal(ev_type);
    IF i_op = 'TRUNCATE' THEN
        sql := format('SELECT %s::text AS t, %L::text AS d, %s::text AS e1, NULL::text AS e2, NULL::text AS e3, NULL::text AS e4, true AS emit, false AS pk_changed',
                      fld[1], CASE WHEN i_fmt = 'json' THEN '{}' ELSE '' END, fld[3]);
        RETURN;
    END IF;

    FOR col IN SELECT a.attname::text AS name, quote_ident(a.attname) AS q, a.atttypid, t.typcategory,
                      -- the type's own equality, else compare the text (as PgQ does)
                      t.typcategory <> 'A' AND EXISTS (
                          SELECT 1 FROM pg_operator op
                           WHERE op.oprname = '=' AND op.oprresult = 'bool'::regtype
                             AND op.oprleft = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
                             AND op.oprright = op.oprleft) AS has_eq
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                WHERE a.attrelid = i_relid AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum LOOP
        changed := CASE WHEN col.has_eq THEN format('(n.%1$s IS DISTINCT FROM o.%1$s)', col.q)
                        ELSE format('(n.%1$s::text IS DISTINCT FROM o.%1$s::text)', col.q) END;
        -- The value as the type's output function writes it (format's %s),
        -- NULL for NULL (num_nulls: a composite of NULLs is not NULL itself);
        -- a template, %1$s being the row's alias (n or o).
        rv := format('CASE WHEN num_nulls(%%1$s.%1$s) = 0 THEN format(''%%%%s'', %%1$s.%1$s) END',
                     replace(col.q, '%', '%%'));
        IF col.name LIKE '\_pgq\_ev\_%' THEN
            i := array_position(fields, substr(col.name, 6));
            IF i IS NULL THEN
                RAISE EXCEPTION 'Unknown magic column: %', col.name;
            END IF;
            fld[i] := format(rv, 'n');
            CONTINUE;
        END IF;
        seen := seen || col.name;
        IF col.name = ANY (ignore_list) THEN
            ign_changed := ign_changed || changed;
            CONTINUE;
        END IF;
        data_changed := data_changed || changed;
        IF i_fmt = 'json' THEN
            part := format('%L || coalesce(%s, ''null'')', replace(to_json(col.name)::text || ':', '%', '%%'),
                CASE WHEN col.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'int8'::regtype,
                                           'int4'::regtype, 'int2'::regtype, 'date'::regtype, 'bool'::regtype)
                     THEN format('to_json(%%1$s.%s)::text', replace(col.q, '%', '%%'))
                     ELSE format('to_json(%s)::text', rv) END);
        ELSE
            -- (sqltriga's backup is the urlencoded old row, as PgQ's.)
            part := format('%L || coalesce(''='' || pgq._urlencode(%s), '''')',
                           replace(pgq._urlencode(col.name), '%', '%%'), rv);
        END IF;
        data_o := data_o || format(part, 'o');
        IF i_fmt = 'sql' THEN
            data_n := data_n || format('coalesce(quote_literal(%s), ''null'')', format(rv, 'n'));
        ELSE
            data_n := data_n || format(part, 'n');
        END IF;
        IF col.name = ANY (pkey_list) THEN
            key_changed := key_changed || changed;
            key_parts := key_parts || format('%L || coalesce(''='' || quote_literal(%s), '' is null'')',
                                             col.q, format(rv, 'o'));
            first_key := coalesce(first_key, format('%L || quote_nullable(%s)', col.q || '=', format(rv, 'o')));
        ELSE
            set_parts := set_parts || format('CASE WHEN %s THEN %L || quote_nullable(%s) END',
                                             changed, col.q || '=', format(rv, 'n'));
        END IF;
        ins_cols := ins_cols || col.q;
    END LOOP;
    -- A misspelt column would silently change the events: refuse it.
    FOREACH arg IN ARRAY pkey_list || ignore_list LOOP
        IF NOT arg = ANY (seen) THEN
            RAISE EXCEPTION 'column "%" of pkey= or ignore= is not a column of table %', arg, tname;
        END IF;
    END LOOP;

    IF i_fmt = 'urlenc' THEN
        ev_data := format('array_to_string(ARRAY[%s]::text[], ''&'')', array_to_string(data_n, ', '));
    ELSIF i_fmt = 'json' THEN
        ev_data := format('''{'' || array_to_string(ARRAY[%s]::text[], '','') || ''}''', array_to_string(data_n, ', '));
    ELSIF i_op = 'INSERT' THEN
        ev_data := format('%L || array_to_string(ARRAY[%s]::text[], '','') || '')''',
                          '(' || array_to_string(ins_cols, ',') || ') values (', array_to_string(data_n, ', '));
    ELSIF i_op = 'UPDATE' THEN
        -- Nothing but the same values again: set the first key to itself, so
        -- the event still says "this row was updated".
        ev_data := format('coalesce(nullif(array_to_string(ARRAY[%s]::text[], '',''), ''''), %s) || '' where '' || array_to_string(ARRAY[%s]::text[], '' and '')',
                          array_to_string(set_parts, ', '), first_key, array_to_string(key_parts, ', '));
    ELSE
        ev_data := format('array_to_string(ARRAY[%s]::text[], '' and '')', array_to_string(key_parts, ', '));
    END IF;
    fld[2] := ev_data;
    IF backup AND i_op = 'UPDATE' THEN
        fld[4] := format(CASE WHEN i_fmt = 'json' THEN '''{'' || array_to_string(ARRAY[%s]::text[], '','') || ''}'''
                              ELSE 'array_to_string(ARRAY[%s]::text[], ''&'')' END,
                         array_to_string(data_o, ', '));
    END IF;
    FOR i IN 1 .. coalesce(array_length(overrides, 1), 0) BY 2 LOOP
        fld[array_position(fields, overrides[i])] := format('(SELECT (%s)::text FROM (SELECT $1.*) r)', overrides[i + 1]);
    END LOOP;
    IF i_op = 'UPDATE' AND cardinality(ign_changed) > 0 THEN
        -- Skipped when ignored columns changed and nothing else did.
        emit := format('NOT ((%s) AND NOT (%s))', array_to_string(ign_changed, ' OR '),
                       coalesce(nullif(array_to_string(data_changed, ' OR '), ''), 'false'));
    END IF;
    IF when_expr IS NOT NULL THEN
        emit := format('%s AND coalesce((SELECT (%s)::boolean FROM (SELECT $1.*) r), false)', emit, when_expr);
    END IF;
    sql := format('SELECT %s::text AS t, %s::text AS d, %s::text AS e1, %s::text AS e2, %s::text AS e3, %s::text AS e4, %s AS emit, %s AS pk_changed FROM (SELECT $1.*) n, (SELECT $2.*) o',
                  coalesce(fld[1], 'NULL'), coalesce(fld[2], 'NULL'), coalesce(fld[3], 'NULL'),
                  coalesce(fld[4], 'NULL'), coalesce(fld[5], 'NULL'), coalesce(fld[6], 'NULL'), emit,
                  CASE WHEN i_op = 'UPDATE' AND cardinality(key_changed) > 0
                       THEN array_to_string(key_changed, ' OR ') ELSE 'false' END);
END $$;

-- The three trigger functions differ only in the format they ask for.
DO $do$
DECLARE
    f text[];
BEGIN
    FOREACH f SLICE 1 IN ARRAY ARRAY[['logutriga', 'urlenc'], ['sqltriga', 'sql'], ['jsontriga', 'json']] LOOP
        EXECUTE format($fn$
CREATE OR REPLACE FUNCTION pgq.%I() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    p record;
    ev record;
BEGIN
    p := pgq._producer_prepare(%L, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, TG_WHEN, TG_LEVEL, TG_ARGV);
    IF p.sql IS NOT NULL THEN
        IF TG_OP = 'INSERT' THEN
            EXECUTE p.sql INTO ev USING NEW, NEW;
        ELSIF TG_OP = 'UPDATE' THEN
            EXECUTE p.sql INTO ev USING NEW, OLD;
        ELSIF TG_OP = 'DELETE' THEN
            EXECUTE p.sql INTO ev USING OLD, OLD;
        ELSE
            EXECUTE p.sql INTO ev;
        END IF;
        IF ev.pk_changed THEN
            RAISE EXCEPTION 'primary key update not allowed';
        END IF;
        IF ev.emit THEN
            PERFORM pgq.insert_event(p.queue_name, ev.t, ev.d, ev.e1, ev.e2, ev.e3, ev.e4);
        END IF;
    END IF;
    IF p.skip OR TG_WHEN = 'AFTER' OR TG_LEVEL = 'STATEMENT' THEN
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $body$$fn$, f[1], f[2]);
    END LOOP;
END $do$;
