-- londiste-rs: merged tables, one destination table fed by the queues of several
-- sources (add-table --merge-all / --no-merge).
--
-- Which source each row came from is kept in an origin map per merged table:
-- a table in schema londiste with the destination's primary key columns (same
-- types) and the queue that wrote the row, keyed like the destination. The
-- worker maintains it set-based in the same transaction as the rows (one
-- statement per group of events), the copy fills it in its own transaction, so
-- it is exactly as current as the table. It lets a TRUNCATE at one source
-- remove only that source's rows, a key sent by two sources be refused naming
-- both, and compare and repair check each source against its own part.
-- Typed key columns, not one text key for all tables: half the apply cost.

ALTER TABLE londiste.table_info ADD COLUMN IF NOT EXISTS merged boolean NOT NULL DEFAULT false;

-- The origin map of each merged table (dest_table as the worker names it:
-- quoted, schema-qualified).
CREATE TABLE IF NOT EXISTS londiste.merge_maps (
    dest_table text PRIMARY KEY,
    map_table text NOT NULL
);

-- The primary key columns of a merged table, in key order.
CREATE OR REPLACE FUNCTION londiste.merge_key(i_dest text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    keys text[] := pgq.table_pkey(i_dest::regclass);
BEGIN
    IF keys IS NULL THEN
        RAISE EXCEPTION 'merged table % has no primary key: add one, rows of several sources are told apart by it', i_dest;
    END IF;
    RETURN keys;
END $$;

-- The origin map of a merged table (its quoted name), created on first use.
CREATE OR REPLACE FUNCTION londiste.merge_map(i_dest text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    m text;
    cols text;
BEGIN
    SELECT map_table INTO m FROM londiste.merge_maps WHERE dest_table = i_dest;
    IF FOUND THEN
        RETURN m;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('londiste.merge'), hashtext(i_dest));
    SELECT map_table INTO m FROM londiste.merge_maps WHERE dest_table = i_dest;
    IF FOUND THEN
        RETURN m;
    END IF;
    m := format('londiste.%I', 'merge_origin_' || left(md5(i_dest), 16));
    SELECT string_agg(format('%I %s NOT NULL', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord)
      INTO cols
      FROM unnest(londiste.merge_key(i_dest)) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = i_dest::regclass AND a.attname = k.name;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (%s, queue_name text NOT NULL, PRIMARY KEY (%s))',
                   m, cols, (SELECT string_agg(format('%I', k), ', ') FROM unnest(londiste.merge_key(i_dest)) k));
    INSERT INTO londiste.merge_maps (dest_table, map_table) VALUES (i_dest, m);
    RETURN m;
END $$;

-- (a.k1, a.k2) for alias a over the key columns.
CREATE OR REPLACE FUNCTION londiste.merge_key_list(i_dest text, i_alias text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '(' || string_agg(format('%I.%I', i_alias, k), ', ') || ')' FROM unnest(londiste.merge_key(i_dest)) k
$$;

-- The SQL condition "row i_alias of the merged table was written by queue $1",
-- for compare and repair.
CREATE OR REPLACE FUNCTION londiste.merge_part_filter(i_dest text, i_alias text) RETURNS text
LANGUAGE sql AS $$
    SELECT format('EXISTS (SELECT 1 FROM %s m WHERE m.queue_name = $1 AND %s = %s)',
                  londiste.merge_map(i_dest), londiste.merge_key_list(i_dest, 'm'), londiste.merge_key_list(i_dest, i_alias))
$$;

-- Removes the rows one queue wrote into a merged table (its source's TRUNCATE,
-- or before that queue copies the table again), leaving the others' rows.
CREATE OR REPLACE FUNCTION londiste.merge_truncate(i_queue text, i_dest text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    m text := londiste.merge_map(i_dest);
    n bigint;
BEGIN
    EXECUTE format('DELETE FROM %s d USING %s m WHERE m.queue_name = $1 AND %s = %s',
                   i_dest, m, londiste.merge_key_list(i_dest, 'm'), londiste.merge_key_list(i_dest, 'd'))
      USING i_queue;
    GET DIAGNOSTICS n = ROW_COUNT;
    EXECUTE format('DELETE FROM %s WHERE queue_name = $1', m) USING i_queue;
    RETURN n;
END $$;

-- Called by a copy into a merged table, in the copy's transaction, before any
-- row is written. The advisory lock (held to the end of that transaction)
-- serialises the copies of one merged table, from whichever queue's worker.
-- Returns true when no other source has rows in the table: this copy is the
-- first and may empty the table (TRUNCATE, which also clears rows from before).
-- Otherwise it removes only this queue's earlier rows and returns false: a
-- source that joins later never touches the others' rows.
CREATE OR REPLACE FUNCTION londiste.merge_prepare_copy(i_queue text, i_dest text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    m text := londiste.merge_map(i_dest);
    others boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('londiste.merge'), hashtext(i_dest));
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE queue_name <> $1)', m) INTO others USING i_queue;
    IF NOT others THEN
        -- The others' workers write under ROW EXCLUSIVE: with this lock none is
        -- in flight, so the check below cannot miss a row about to commit.
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', i_dest);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE queue_name <> $1)', m) INTO others USING i_queue;
        IF NOT others THEN
            EXECUTE format('TRUNCATE %s', m);
            RETURN true;
        END IF;
    END IF;
    PERFORM londiste.merge_truncate(i_queue, i_dest);
    RETURN false;
END $$;

-- After the copy's COPY: the rows without an origin are the ones just copied
-- (every committed row has one, written with it; rows other transactions have
-- not committed are not visible here), so they are this queue's.
CREATE OR REPLACE FUNCTION londiste.merge_claim_copied(i_queue text, i_dest text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    m text := londiste.merge_map(i_dest);
    n bigint;
BEGIN
    EXECUTE format('INSERT INTO %s SELECT %s, $1 FROM %s d WHERE NOT EXISTS (SELECT 1 FROM %s m WHERE %s = %s)',
                   m, (SELECT string_agg(format('d.%I', k), ', ') FROM unnest(londiste.merge_key(i_dest)) k),
                   i_dest, m, londiste.merge_key_list(i_dest, 'm'), londiste.merge_key_list(i_dest, 'd'))
      USING i_queue;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- "(k1, k2) = ($1[1]::t1, $1[2]::t2)" over alias m: a key from its values as text.
CREATE OR REPLACE FUNCTION londiste.merge_key_match(i_dest text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT londiste.merge_key_list(i_dest, 'm') || ' = (' ||
           string_agg(format('($1[%s])::%s', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord) || ')'
      FROM unnest(londiste.merge_key(i_dest)) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = i_dest::regclass AND a.attname = k.name
$$;

-- The queue that wrote a key of a merged table, from the key's values as text
-- (for a copy's duplicate-key error, which gives only the values).
CREATE OR REPLACE FUNCTION londiste.merge_owner(i_dest text, i_values text[]) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    owner text;
BEGIN
    EXECUTE format('SELECT queue_name FROM %s m WHERE %s', londiste.merge_map(i_dest), londiste.merge_key_match(i_dest))
      INTO owner USING i_values;
    RETURN owner;
END $$;

-- repair of a merged table: the row it inserts becomes this queue's (i_queue),
-- the one it deletes loses its origin (i_queue NULL).
CREATE OR REPLACE FUNCTION londiste.merge_set_owner(i_dest text, i_values text[], i_queue text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m text := londiste.merge_map(i_dest);
BEGIN
    EXECUTE format('DELETE FROM %s m WHERE %s', m, londiste.merge_key_match(i_dest)) USING i_values;
    IF i_queue IS NOT NULL THEN
        EXECUTE format('INSERT INTO %s SELECT %s, $2', m,
                       (SELECT string_agg(format('($1[%s])::%s', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord)
                          FROM unnest(londiste.merge_key(i_dest)) WITH ORDINALITY AS k(name, ord)
                          JOIN pg_attribute a ON a.attrelid = i_dest::regclass AND a.attname = k.name))
          USING i_values, i_queue;
    END IF;
END $$;
