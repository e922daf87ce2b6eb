-- londiste-rs: capture triggers, part of the pgq component.
--
-- One event per changed row, written by statement-level AFTER triggers with
-- transition tables: a multi-row statement costs one INSERT ... SELECT into the
-- queue, not one PL/pgSQL call per row. The trigger functions are generated per
-- (queue, table) so that every statement in them is static SQL with a cached plan.
--
-- Event format (documented in londiste-rs(7)):
--   ev_type   'I' insert, 'U' update (upsert of the new row), 'D' delete, 'R' truncate
--   ev_data   the row as PostgreSQL's composite text (the new row for I/U, the old row for D)
--   ev_extra1 the table, schema-qualified, identifiers quoted where needed
--   ev_extra2 the column names of ev_data, as a text[] literal
--   ev_extra3 the key columns, as a text[] literal
-- An UPDATE that changes key values emits 'D' for each key that vanished, then 'U'
-- for every new row: the replica's final state is the same whatever the pairing.
-- The row text is produced under fixed DateStyle, IntervalStyle, TimeZone,
-- extra_float_digits, bytea_output and lc_monetary (the functions' SET clauses),
-- so it is exact and reads back the same on the replica whatever the writer's
-- session settings were.

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

CREATE OR REPLACE FUNCTION pgq._capture_fn_name(i_queue_id int4, i_table regclass, i_op text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT format('pgq._cap_%s_%s_%s', i_queue_id, i_table::oid, i_op) $$;

-- Creates (or replaces) the capture triggers of a table for a queue.
--   i_keys: key columns; NULL means the primary key. A table with neither can
--           still be captured for INSERT; UPDATE and DELETE then raise an error
--           that names the table and the fix.
--   i_mode: 'capture' (root: emit events) or 'deny' (replica: refuse local writes,
--           let the replication worker through).
CREATE OR REPLACE FUNCTION pgq.capture_create(i_queue_name text, i_table regclass, i_keys text[], i_mode text)
RETURNS text LANGUAGE plpgsql AS $gen$
DECLARE
    q pgq.queue;
    keys text[];
    keylit text;
    tname text;
    settings text := $s$
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres'
SET timezone = 'UTC'
SET extra_float_digits = 3
SET bytea_output = 'hex'
SET lc_monetary = 'C'
$s$;
    prologue text;
    body_i text := '';
    body_u text := '';
    body_d text := '';
    body_r text := '';
    join_cond text;
    k text;
    i int4;
    slot text;
    cols text := '(ev_time, ev_txid, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3)';
    nokey text;
BEGIN
    q := pgq._queue(i_queue_name);
    PERFORM pgq.capture_drop(i_queue_name, i_table);
    tname := (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = i_table);

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
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                       '_pgq_' || q.queue_id || '_deny', i_table, pgq._capture_fn_name(q.queue_id, i_table, 'deny'));
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

    prologue := format($p$
<<cap>>
DECLARE
    cur int4;
    dis boolean;
    tx bigint;
    ts timestamptz;
    tn text;
    cols text;
BEGIN
    IF coalesce(current_setting('londiste.replay', true), '') = 'on'
       OR current_setting('session_replication_role') = 'local' THEN
        RETURN NULL;
    END IF;
    SELECT queue_cur_table, queue_disable_insert INTO cur, dis FROM pgq.queue WHERE queue_id = %s;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue of the capture trigger on %% is gone; drop the trigger or re-add the table', TG_TABLE_NAME;
    END IF;
    IF dis AND current_setting('session_replication_role') <> 'replica' THEN
        RAISE EXCEPTION 'Insert into queue disallowed (table %%.%%)', TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;
    tx := txid_current();
    ts := now();
    tn := quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME);
    -- The table's OID is a constant here, so this plan is made once per session.
    SELECT array_agg(attname::text ORDER BY attnum)::text INTO cols FROM pg_catalog.pg_attribute
     WHERE attrelid = %s::oid AND attnum > 0 AND NOT attisdropped;
$p$, q.queue_id, i_table::oid);

    nokey := $n$
    RAISE EXCEPTION 'table % has no primary key, so OP cannot be replicated', tn
        USING HINT = 'add a primary key, or name the key columns: londiste-rs CONFIG add-table TABLE --key=COL[,COL]';
$n$;

    FOR i IN 0 .. q.queue_ntables - 1 LOOP
        slot := format('%s_%s', q.queue_data_pfx, i);
        body_i := body_i || format($x$
    %s cur = %s THEN
        INSERT INTO %s %s SELECT cap.ts, cap.tx, 'I', (n.*)::text, cap.tn, cap.cols, %L FROM new_rows n;$x$,
            CASE WHEN i = 0 THEN 'IF' ELSE 'ELSIF' END, i, slot, cols, keylit);
        IF keys IS NOT NULL THEN
            body_u := body_u || format($x$
    %s cur = %s THEN
        INSERT INTO %s %s
        SELECT cap.ts, cap.tx, 'D', (o.*)::text, cap.tn, cap.cols, %L FROM old_rows o
         WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE %s)
        UNION ALL
        SELECT cap.ts, cap.tx, 'U', (n.*)::text, cap.tn, cap.cols, %L FROM new_rows n;$x$,
                CASE WHEN i = 0 THEN 'IF' ELSE 'ELSIF' END, i, slot, cols, keylit, join_cond, keylit);
            body_d := body_d || format($x$
    %s cur = %s THEN
        INSERT INTO %s %s SELECT cap.ts, cap.tx, 'D', (o.*)::text, cap.tn, cap.cols, %L FROM old_rows o;$x$,
                CASE WHEN i = 0 THEN 'IF' ELSE 'ELSIF' END, i, slot, cols, keylit);
        END IF;
        body_r := body_r || format($x$
    %s cur = %s THEN
        INSERT INTO %s %s VALUES (cap.ts, cap.tx, 'R', '', cap.tn, cap.cols, %L);$x$,
            CASE WHEN i = 0 THEN 'IF' ELSE 'ELSIF' END, i, slot, cols, keylit);
    END LOOP;
    body_i := body_i || E'\n    END IF;\n    RETURN NULL;\nEND';
    body_r := body_r || E'\n    END IF;\n    RETURN NULL;\nEND';
    IF keys IS NOT NULL THEN
        body_u := body_u || E'\n    END IF;\n    RETURN NULL;\nEND';
        body_d := body_d || E'\n    END IF;\n    RETURN NULL;\nEND';
    ELSE
        -- Only raise when rows are actually touched: an UPDATE that matches nothing
        -- must not fail.
        body_u := E'\n    IF EXISTS (SELECT 1 FROM new_rows) THEN' || replace(nokey, 'OP', 'UPDATE') || E'    END IF;\n    RETURN NULL;\nEND';
        body_d := E'\n    IF EXISTS (SELECT 1 FROM old_rows) THEN' || replace(nokey, 'OP', 'DELETE') || E'    END IF;\n    RETURN NULL;\nEND';
    END IF;

    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'i'), settings, prologue || body_i);
    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'u'), settings, prologue || body_u);
    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'd'), settings, prologue || body_d);
    EXECUTE format('CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql %s AS %L',
                   pgq._capture_fn_name(q.queue_id, i_table, 'r'), settings, prologue || body_r);

    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   '_pgq_' || q.queue_id || '_ins', i_table, pgq._capture_fn_name(q.queue_id, i_table, 'i'));
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   '_pgq_' || q.queue_id || '_upd', i_table, pgq._capture_fn_name(q.queue_id, i_table, 'u'));
    EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   '_pgq_' || q.queue_id || '_del', i_table, pgq._capture_fn_name(q.queue_id, i_table, 'd'));
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   '_pgq_' || q.queue_id || '_trunc', i_table, pgq._capture_fn_name(q.queue_id, i_table, 'r'));
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
BEGIN
    q := pgq._queue(i_queue_name);
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
