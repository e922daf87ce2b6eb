-- londiste-rs: capture triggers, part of the pgq component.
--
-- Written by statement-level AFTER triggers with transition tables: a statement
-- costs one INSERT ... SELECT into the queue, not one PL/pgSQL call per row, and
-- its rows travel in chunks of up to 1000 per event, so a bulk load writes a
-- thousandth of the event rows. The trigger functions are generated per
-- (queue, table) so that every statement in them is static SQL with a cached plan.
--
-- Event format (documented in londiste-rs(1), EVENT FORMAT):
--   ev_type   'I' insert, 'U' update (upsert of the new row), 'D' delete, 'R' truncate;
--             'I*', 'U*', 'D*': the same for several rows
--   ev_data   the row as PostgreSQL's composite text (the new row for I/U, the old
--             row for D); for 'X*' events several rows, separated by newlines (a
--             newline inside a value is always within double quotes)
--   ev_extra1 the table, schema-qualified, identifiers quoted where needed
--   ev_extra2 the column names of ev_data, as a JSON object with null values in
--             column order ({"id":null,"name":null}); older versions wrote a
--             text[] literal, which consumers still accept
--   ev_extra3 the key columns, as a text[] literal
-- An UPDATE that changes key values emits 'D' for each key that vanished, then 'U'
-- for every new row: the replica's final state is the same whatever the pairing.
-- The row text is produced in the canonical forms (DateStyle ISO, IntervalStyle
-- postgres, extra_float_digits > 0, bytea_output hex and, for tables with money,
-- lc_monetary C); a session with other settings is switched to them for the
-- statement. Timestamps with time zone carry their offset, so TimeZone does not
-- matter. The text reads back exactly on the replica.

CREATE OR REPLACE FUNCTION pgq._colnames(i_rel oid) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT array_agg(attname::text ORDER BY attnum)::text
      FROM pg_attribute WHERE attrelid = i_rel AND attnum > 0 AND NOT attisdropped
$$;

-- Primary key columns of a table, in key order; NULL when it has none.
CREATE OR REPLACE FUNCTION pgq.table_pkey(i_table regclass) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg(a.attname::text ORDER BY k.ord)
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = i_table AND i.indisprimary
$$;

-- Does a column of the table involve money (directly, in a domain, an array, a
-- range or a composite)? Its text then depends on lc_monetary.
CREATE OR REPLACE FUNCTION pgq._type_uses_money(i_table regclass) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    found boolean;
BEGIN
    -- Multiranges (pg_range.rngmultitypid) are 14+.
    EXECUTE format($q$
    WITH RECURSIVE t(oid) AS (
        SELECT atttypid FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
        UNION
        SELECT x FROM t JOIN pg_type ty ON ty.oid = t.oid
         CROSS JOIN LATERAL (
             SELECT ty.typbasetype WHERE ty.typbasetype <> 0
             UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0
             UNION ALL SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = ty.typrelid AND ty.typrelid <> 0 AND a.attnum > 0
             UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid
             %s
         ) n(x)
    )
    SELECT EXISTS (SELECT 1 FROM t WHERE oid = 'money'::regtype)$q$,
        CASE WHEN pgq._server_version() >= 140000
             THEN 'UNION ALL SELECT m.rngtypid FROM pg_range m WHERE m.rngmultitypid = ty.oid' ELSE '' END)
    INTO found USING i_table;
    RETURN found;
END $$;

-- Switch the settings that shape value text to the canonical forms for the rest
-- of the statement; returns the old values for _capture_settings_leave.
-- Transaction-local, so an error in between undoes it as well.
CREATE OR REPLACE FUNCTION pgq._capture_settings_enter() RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    old text[] := ARRAY[current_setting('DateStyle'), current_setting('IntervalStyle'),
                        current_setting('extra_float_digits'), current_setting('bytea_output'),
                        current_setting('lc_monetary')];
BEGIN
    PERFORM set_config('DateStyle', 'ISO, YMD', true), set_config('IntervalStyle', 'postgres', true),
            set_config('extra_float_digits', '3', true), set_config('bytea_output', 'hex', true),
            set_config('lc_monetary', 'C', true);
    RETURN old;
END $$;

CREATE OR REPLACE FUNCTION pgq._capture_settings_leave(i_old text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('DateStyle', i_old[1], true), set_config('IntervalStyle', i_old[2], true),
            set_config('extra_float_digits', i_old[3], true), set_config('bytea_output', i_old[4], true),
            set_config('lc_monetary', i_old[5], true);
END $$;

-- The statement `stmt` once per event table of the queue, for the one that is
-- current (`cur`): plans stay static, and the table can rotate under them.
CREATE OR REPLACE FUNCTION pgq._capture_dispatch(q pgq.queue, stmt text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    out text := '';
BEGIN
    FOR i IN 0 .. q.queue_ntables - 1 LOOP
        out := out || format(E'\n    %s cur = %s THEN\n        %s',
            CASE WHEN i = 0 THEN 'IF' ELSE 'ELSIF' END, i,
            replace(stmt, '@EVENTS@', format('%s_%s', q.queue_data_pfx, i)));
    END LOOP;
    RETURN out || E'\n    END IF;';
END $$;

-- `single` when the transition table holds at most one row, else `multi` (the
-- prologue's queue lookup tells which, in the same statement).
DROP FUNCTION IF EXISTS pgq._capture_by_size(text, pgq.queue, text, text);
CREATE OR REPLACE FUNCTION pgq._capture_by_size(q pgq.queue, single text, multi text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT E'\n    IF NOT multi THEN'
        || replace(pgq._capture_dispatch(q, single), E'\n', E'\n    ')
        || E'\n    ELSE'
        || replace(pgq._capture_dispatch(q, multi), E'\n', E'\n    ')
        || E'\n    END IF;'
$$;

-- The two statements that write the rows of transition table `rel` as events
-- of kind `k` ('I' or 'D'): one plain event for a single row, or events of up
-- to 1000 rows each (kind 'I*' / 'D*', rows separated by newlines). An event
-- is also closed once its rows pass 4 MB of text (the running sum is over the
-- same window as the row number, so it costs no second pass; OFFSET 0 keeps
-- the row text computed once, where a flattened subquery would run record_out
-- for every use of it, 30% more on a bulk insert): 1000 rows of
-- 1 MB make 250 events, not one of 1 GB (PostgreSQL's limit for a value),
-- and no reader has to hold more than a few MB for one event.
CREATE OR REPLACE FUNCTION pgq._capture_rows(ins text, k text, rel text, tname text, colq text, keylit text,
                                             OUT single text, OUT multi text)
LANGUAGE sql IMMUTABLE AS $f$
    SELECT ins || format($x$
        SELECT %L, (x.*)::text, %L, %s, %L FROM %s x;$x$, k, tname, colq, keylit, rel),
           ins || format($x$
        SELECT CASE WHEN count(*) = 1 THEN %L ELSE %L END, string_agg(s.r, E'\n'), %L, %s, %L
          FROM (SELECT r, (row_number() OVER w - 1) / 1000 AS g,
                       (sum(octet_length(r)) OVER w - octet_length(r)) / 4194304 AS b
                  FROM (SELECT (x.*)::text AS r FROM %s x OFFSET 0) x WINDOW w AS (ROWS UNBOUNDED PRECEDING)) s
         GROUP BY s.g, s.b;$x$, k, k || '*', tname, colq, keylit, rel)
$f$;

CREATE OR REPLACE FUNCTION pgq._capture_fn_name(i_queue_id int4, i_table regclass, i_op text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT format('pgq._cap_%s_%s_%s', i_queue_id, i_table::oid, i_op) $$;

-- Creates (or replaces) the capture triggers of a table for a queue.
--   i_keys: key columns; NULL means the primary key. A table with neither can
--           still be captured for INSERT; UPDATE and DELETE then raise an error
--           that names the table and the fix.
--   i_mode: 'capture' (root: emit events) or 'deny' (replica: refuse local writes,
--           let the replication worker through).
--   i_event_name: the table name the events carry (NULL: the table's own).
-- A partitioned table's statement triggers see the rows of all its partitions,
-- but fire only for statements that name it: each partition (at every level)
-- gets triggers of its own, whose events carry the parent's name and keys, so
-- a write straight into a partition is captured too, once. A TRUNCATE of one
-- partition is refused: replayed as the parent's, it would empty them all.
DROP FUNCTION IF EXISTS pgq.capture_create(text, regclass, text[], text);
CREATE OR REPLACE FUNCTION pgq.capture_create(i_queue_name text, i_table regclass, i_keys text[], i_mode text,
                                              i_event_name text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $gen$
DECLARE
    q pgq.queue;
    keys text[];
    keylit text;
    relname text;
    tname text;
    part record;
    -- SECURITY DEFINER: writers of a captured table need no rights on the queue
    -- (and so cannot forge events). The fixed search_path keeps that safe.
    settings text := $s$
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
$s$;
    prologue text;
    body_i text := '';
    body_u text := '';
    body_d text := '';
    body_r text := '';
    join_cond text;
    k text;
    cols text := '(ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3)';
    nokey text;
    canon text;
    leave text;
    ins text;
    colq text;
    one text;
    many text;
BEGIN
    q := pgq._queue(i_queue_name);
    PERFORM pgq.capture_drop(i_queue_name, i_table);
    relname := (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = i_table);
    tname := coalesce(i_event_name, relname);

    IF i_mode = 'deny' THEN
        EXECUTE format($f$CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS $b$
BEGIN
    IF coalesce(current_setting('londiste.replay', true), '') = 'on'
       OR current_setting('session_replication_role') <> 'origin' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'table %% is replicated into this node from queue %% (%% refused): write to the root node instead', %L, %L, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $b$$f$, pgq._capture_fn_name(q.queue_id, i_table, 'deny'), settings, tname, i_queue_name);
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE %s %s()',
                       '_pgq_' || q.queue_id || '_deny', i_table, pgq._trigger_exec(), pgq._capture_fn_name(q.queue_id, i_table, 'deny'));
        RETURN '_pgq_' || q.queue_id || '_deny';
    END IF;

    keys := coalesce(i_keys, pgq.table_pkey(i_table));
    IF keys IS NOT NULL THEN
        FOREACH k IN ARRAY keys LOOP
            PERFORM 1 FROM pg_attribute WHERE attrelid = i_table AND attname = k AND attnum > 0 AND NOT attisdropped;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'key column "%" does not exist in table %', k, tname;
            END IF;
        END LOOP;
        keylit := keys::text;
        SELECT string_agg(format('n.%I = o.%I', x, x), ' AND ') INTO join_cond FROM unnest(keys) x;
    END IF;

    -- Fast path: when the writer's session already prints values in the canonical
    -- forms (the defaults), the row text is used as is. Otherwise the settings
    -- are switched for the statement and put back (transaction-local set_config),
    -- so that exotic sessions pay and ordinary ones do not: SET clauses on the
    -- function would cost every statement a GUC save and restore.
    canon := $c$current_setting('DateStyle') LIKE 'ISO%' AND current_setting('IntervalStyle') = 'postgres'
       AND current_setting('extra_float_digits')::int4 > 0 AND current_setting('bytea_output') = 'hex'$c$;
    IF pgq._type_uses_money(i_table) THEN
        canon := canon || $c$ AND current_setting('lc_monetary') = 'C'$c$;
    END IF;
    prologue := format($p$
<<cap>>
DECLARE
    cur int4;
    dis boolean;
    saved text[];
    cj text;
    multi boolean := false;
BEGIN
    IF current_setting('londiste.replay', true) = 'on'
       OR current_setting('session_replication_role') = 'local' THEN
        RETURN NULL;
    END IF;
    SELECT queue_cur_table, queue_disable_insert@MULTI@ INTO cur, dis, multi FROM pgq.queue WHERE queue_id = %s;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue of the capture trigger on %%.%% is gone; drop the trigger or re-add the table', TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;
    IF dis AND current_setting('session_replication_role') <> 'replica' THEN
        RAISE EXCEPTION 'Insert into queue disallowed (table %%.%%)', TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;
    IF NOT (%s) THEN
        saved := pgq._capture_settings_enter();
    END IF;
    -- The column names, as a JSON object of nulls in column order. Through the
    -- row type it comes from the relation cache (no catalog query); the
    -- expression is planned on first use only, so after a rename of the table
    -- the catalog branch keeps writes working.
    IF to_regclass(%L) = %s::oid THEN
        cj := to_json(json_populate_record(NULL::%s, '{}'))::text;
    ELSE
        cj := (SELECT json_object_agg(attname, NULL ORDER BY attnum)::text FROM pg_attribute
                WHERE attrelid = %s::oid AND attnum > 0 AND NOT attisdropped);
    END IF;
$p$, q.queue_id, canon, relname, i_table::oid, relname, i_table::oid);
    leave := E'\n    IF saved IS NOT NULL THEN\n        PERFORM pgq._capture_settings_leave(saved);\n    END IF;\n    RETURN NULL;\nEND';
    colq := 'cap.cj';

    nokey := $n$
    RAISE EXCEPTION 'table %.% has no primary key, so OP cannot be replicated', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING HINT = 'add a primary key, or name the key columns: add-table TABLE --key=COL[,COL]';
$n$;

    -- Rows go in chunks of up to 1000 per event (type 'I*', 'U*', 'D*', rows
    -- separated by newlines); a statement that touches one row writes a plain
    -- 'I', 'U' or 'D' event through a simpler statement (the chunking's window
    -- and aggregate cost a third of the trigger's time on single-row writes).
    -- The order of rows inside one statement does not matter: its new rows have
    -- distinct keys, and the deleted keys are not among them (the deletes are
    -- still written first, for readers of the queue).
    ins := format('INSERT INTO @EVENTS@ %s', cols);
    SELECT * INTO one, many FROM pgq._capture_rows(ins, 'I', 'new_rows', tname, colq, keylit);
    body_i := pgq._capture_by_size(q, one, many) || leave;
    IF i_event_name IS NULL THEN
        body_r := pgq._capture_dispatch(q, ins || format($x$ VALUES ('R', '', %L, %s, %L);$x$, tname, colq, keylit)) || leave;
    ELSE
        body_r := format($x$
    RAISE EXCEPTION 'partition %% of replicated table %%: its TRUNCATE cannot be replicated alone', TG_TABLE_NAME, %L
        USING HINT = 'DELETE its rows instead, or TRUNCATE the parent table';$x$, tname) || leave;
    END IF;
    IF keys IS NOT NULL THEN
        body_u := pgq._capture_by_size(q,
            ins || format($x$
        SELECT 'D', (o.*)::text, %1$L, %2$s, %3$L FROM old_rows o WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE %4$s)
        UNION ALL
        SELECT 'U', (n.*)::text, %1$L, %2$s, %3$L FROM new_rows n;$x$, tname, colq, keylit, join_cond),
            ins || format($x$
        SELECT CASE WHEN count(*) = 1 THEN s.k ELSE s.k || '*' END, string_agg(s.r, E'\n'), %L, %s, %L
          FROM (SELECT 'D' AS k, r, (row_number() OVER w - 1) / 1000 AS g,
                       (sum(octet_length(r)) OVER w - octet_length(r)) / 4194304 AS b
                  FROM (SELECT (o.*)::text AS r FROM old_rows o
                         WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE %s) OFFSET 0) d WINDOW w AS (ROWS UNBOUNDED PRECEDING)
                UNION ALL
                SELECT 'U', r, (row_number() OVER w - 1) / 1000,
                       (sum(octet_length(r)) OVER w - octet_length(r)) / 4194304
                  FROM (SELECT (n.*)::text AS r FROM new_rows n OFFSET 0) u WINDOW w AS (ROWS UNBOUNDED PRECEDING)) s
         GROUP BY s.k, s.g, s.b ORDER BY s.k, s.g, s.b;$x$, tname, colq, keylit, join_cond)) || leave;
        SELECT * INTO one, many FROM pgq._capture_rows(ins, 'D', 'old_rows', tname, colq, keylit);
        body_d := pgq._capture_by_size(q, one, many) || leave;
    ELSE
        -- Only raise when rows are actually touched: an UPDATE that matches nothing
        -- must not fail.
        body_u := E'\n    IF EXISTS (SELECT 1 FROM new_rows) THEN' || replace(nokey, 'OP', 'UPDATE') || E'    END IF;' || leave;
        body_d := E'\n    IF EXISTS (SELECT 1 FROM old_rows) THEN' || replace(nokey, 'OP', 'DELETE') || E'    END IF;' || leave;
    END IF;

    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'i'), settings, replace(prologue, '@MULTI@', ', EXISTS (SELECT FROM new_rows OFFSET 1)') || body_i);
    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'u'), settings, CASE WHEN keys IS NULL THEN replace(prologue, '@MULTI@', ', false') ELSE replace(prologue, '@MULTI@', ', EXISTS (SELECT FROM new_rows OFFSET 1)') END || body_u);
    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'd'), settings, CASE WHEN keys IS NULL THEN replace(prologue, '@MULTI@', ', false') ELSE replace(prologue, '@MULTI@', ', EXISTS (SELECT FROM old_rows OFFSET 1)') END || body_d);
    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'r'), settings, replace(prologue, '@MULTI@', ', false') || body_r);

    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE %s %s()',
                   '_pgq_' || q.queue_id || '_ins', i_table, pgq._trigger_exec(), pgq._capture_fn_name(q.queue_id, i_table, 'i'));
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE %s %s()',
                   '_pgq_' || q.queue_id || '_upd', i_table, pgq._trigger_exec(), pgq._capture_fn_name(q.queue_id, i_table, 'u'));
    EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE %s %s()',
                   '_pgq_' || q.queue_id || '_del', i_table, pgq._trigger_exec(), pgq._capture_fn_name(q.queue_id, i_table, 'd'));
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE %s %s()',
                   '_pgq_' || q.queue_id || '_trunc', i_table, pgq._trigger_exec(), pgq._capture_fn_name(q.queue_id, i_table, 'r'));
    FOR part IN SELECT i.inhrelid::regclass AS rel FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
                 WHERE i.inhparent = i_table AND c.relkind = 'p' LOOP
        PERFORM pgq.capture_create(i_queue_name, part.rel, keys, i_mode, tname);
    END LOOP;
    RETURN '_pgq_' || q.queue_id;
END $gen$;

CREATE OR REPLACE FUNCTION pgq.capture_create(i_queue_name text, i_table regclass) RETURNS text
LANGUAGE sql AS $$ SELECT pgq.capture_create(i_queue_name, i_table, NULL, 'capture') $$;

CREATE OR REPLACE FUNCTION pgq.capture_drop(i_queue_name text, i_table regclass) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    op text;
    tg text;
    n int4 := 0;
    part record;
BEGIN
    q := pgq._queue(i_queue_name);
    FOR part IN SELECT i.inhrelid::regclass AS rel FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
                 WHERE i.inhparent = i_table AND c.relkind = 'p' LOOP
        n := n + pgq.capture_drop(i_queue_name, part.rel);
    END LOOP;
    FOREACH tg IN ARRAY ARRAY['ins', 'upd', 'del', 'trunc', 'deny'] LOOP
        PERFORM 1 FROM pg_trigger WHERE tgrelid = i_table AND tgname = '_pgq_' || q.queue_id || '_' || tg;
        IF FOUND THEN
            EXECUTE format('DROP TRIGGER %I ON %s', '_pgq_' || q.queue_id || '_' || tg, i_table);
            n := n + 1;
        END IF;
    END LOOP;
    FOREACH op IN ARRAY ARRAY['i', 'u', 'd', 'r', 'deny'] LOOP
        IF to_regprocedure(pgq._capture_fn_name(q.queue_id, i_table, op) || '()') IS NOT NULL THEN
            EXECUTE format('DROP FUNCTION %s()', pgq._capture_fn_name(q.queue_id, i_table, op));
        END IF;
    END LOOP;
    RETURN n;
END $$;
