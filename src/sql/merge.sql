-- londiste-rs: merged tables, one destination table fed by the queues of several
-- sources (add-table --merge-all / --no-merge).
--
-- Which source each row came from is kept in merge_origin, one row per row of
-- the merged table: its key as the text of ROW(key columns) and the queue that
-- wrote it. The worker maintains it set-based in the same statements group and
-- transaction as the rows themselves, the copy fills it in its own transaction,
-- so it is exactly as current as the table. It is what lets a TRUNCATE at one
-- source remove only that source's rows, a key sent by two sources be refused
-- naming both, and compare check each source against its own part.

ALTER TABLE londiste.table_info ADD COLUMN IF NOT EXISTS merged boolean NOT NULL DEFAULT false;

-- Byte-order collation: keys are compared, never sorted for people, and the
-- locale's comparison would cost the apply more than the index itself.
CREATE TABLE IF NOT EXISTS londiste.merge_origin (
    dest_table text COLLATE "C" NOT NULL,
    row_key text COLLATE "C" NOT NULL,
    queue_name text COLLATE "C" NOT NULL,
    PRIMARY KEY (dest_table, row_key)
);

-- ROW(alias.k1, alias.k2)::text over the primary key of a merged table: the same
-- text the worker computes from an event's key values cast to the column types.
CREATE OR REPLACE FUNCTION londiste.merge_key_expr(i_dest regclass, i_alias text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    keys text[] := pgq.table_pkey(i_dest);
BEGIN
    IF keys IS NULL THEN
        RAISE EXCEPTION 'merged table % has no primary key: add one, rows of several sources are told apart by it', i_dest;
    END IF;
    RETURN 'ROW(' || (SELECT string_agg(format('%I.%I', i_alias, k), ', ') FROM unnest(keys) k) || ')::text';
END $$;

-- Removes the rows one queue wrote into a merged table (its source's TRUNCATE,
-- or before that queue copies the table again), leaving the others' rows.
CREATE OR REPLACE FUNCTION londiste.merge_truncate(i_queue text, i_dest text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format('DELETE FROM %s d USING londiste.merge_origin m
                     WHERE m.dest_table = $1 AND m.queue_name = $2 AND m.row_key = %s',
                   i_dest, londiste.merge_key_expr(i_dest::regclass, 'd'))
      USING i_dest, i_queue;
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM londiste.merge_origin WHERE dest_table = i_dest AND queue_name = i_queue;
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
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('londiste.merge'), hashtext(i_dest));
    IF NOT EXISTS (SELECT 1 FROM londiste.merge_origin WHERE dest_table = i_dest AND queue_name <> i_queue) THEN
        -- The others' workers write under ROW EXCLUSIVE: with this lock none is
        -- in flight, so the check below cannot miss a row about to commit.
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', i_dest);
        IF NOT EXISTS (SELECT 1 FROM londiste.merge_origin WHERE dest_table = i_dest AND queue_name <> i_queue) THEN
            DELETE FROM londiste.merge_origin WHERE dest_table = i_dest;
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
    n bigint;
    k text := londiste.merge_key_expr(i_dest::regclass, 'd');
BEGIN
    EXECUTE format('INSERT INTO londiste.merge_origin (dest_table, row_key, queue_name)
                    SELECT $1, %s, $2 FROM %s d
                     WHERE NOT EXISTS (SELECT 1 FROM londiste.merge_origin m WHERE m.dest_table = $1 AND m.row_key = %s)',
                   k, i_dest, k)
      USING i_dest, i_queue;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- The queue that wrote a key of a merged table, from the key's values as text
-- (for a copy's duplicate-key error, which gives only the values).
CREATE OR REPLACE FUNCTION londiste.merge_owner(i_dest text, i_values text[]) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    expr text;
    owner text;
BEGIN
    SELECT 'ROW(' || string_agg(format('($1[%s])::%s', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord) || ')::text'
      INTO expr
      FROM unnest(pgq.table_pkey(i_dest::regclass)) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = i_dest::regclass AND a.attname = k.name;
    EXECUTE format('SELECT queue_name FROM londiste.merge_origin WHERE dest_table = $2 AND row_key = %s', expr)
      INTO owner USING i_values, i_dest;
    RETURN owner;
END $$;

-- repair of a merged table: the row it inserts becomes this queue's (i_queue),
-- the one it deletes loses its origin (i_queue NULL).
CREATE OR REPLACE FUNCTION londiste.merge_set_owner(i_dest text, i_values text[], i_queue text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    expr text;
BEGIN
    SELECT 'ROW(' || string_agg(format('($1[%s])::%s', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord) || ')::text'
      INTO expr
      FROM unnest(pgq.table_pkey(i_dest::regclass)) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = i_dest::regclass AND a.attname = k.name;
    IF i_queue IS NULL THEN
        EXECUTE format('DELETE FROM londiste.merge_origin WHERE dest_table = $2 AND row_key = %s', expr)
          USING i_values, i_dest;
    ELSE
        EXECUTE format('INSERT INTO londiste.merge_origin (dest_table, row_key, queue_name) VALUES ($2, %s, $3)
                        ON CONFLICT (dest_table, row_key) DO UPDATE SET queue_name = EXCLUDED.queue_name', expr)
          USING i_values, i_dest, i_queue;
    END IF;
END $$;
