-- londiste-rs: node, table and sequence state, kept in SQL on every node.
--
-- One row per (queue, node) in node_info holds the node's role and, on subscribers,
-- the worker's position (last_tick_id): the worker updates it in the same
-- transaction as the rows it applies, which is what makes apply exactly-once.
-- Plain SQL, no superuser; installed idempotently like the pgq schema.

CREATE SCHEMA IF NOT EXISTS londiste;

CREATE TABLE IF NOT EXISTS londiste.node_info (
    queue_name text PRIMARY KEY,
    node_type text NOT NULL CHECK (node_type IN ('root', 'branch', 'leaf')),
    node_name text NOT NULL,
    worker_name text NOT NULL,
    node_location text NOT NULL,
    provider_node text,
    provider_location text,
    last_tick_id bigint,
    paused boolean NOT NULL DEFAULT false,
    uptodate boolean NOT NULL DEFAULT true,
    cur_error text,
    error_time timestamptz,
    last_batch_time timestamptz,
    worker_seen timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Members of the set, as this node knows them (the root knows all).
CREATE TABLE IF NOT EXISTS londiste.node_location (
    queue_name text NOT NULL,
    node_name text NOT NULL,
    node_location text NOT NULL,
    node_type text,
    provider_node text,
    dead boolean NOT NULL DEFAULT false,
    PRIMARY KEY (queue_name, node_name)
);

-- merge_state: NULL = waiting for its copy, 'in-copy', 'catching-up' (copied; the
-- copy thread replays events newer than its snapshot), 'ok' (the worker applies).
-- custom_snapshot: the copy's txid snapshot; events visible in it are in the copy.
CREATE TABLE IF NOT EXISTS londiste.table_info (
    queue_name text NOT NULL REFERENCES londiste.node_info (queue_name) ON DELETE CASCADE,
    table_name text NOT NULL,
    dest_table text,
    local boolean NOT NULL DEFAULT true,
    merge_state text,
    custom_snapshot text,
    copy_tick bigint,
    key_columns text[],
    table_attrs text,
    skip_truncate boolean NOT NULL DEFAULT false,
    copy_rows bigint,
    copy_bytes bigint,
    copy_estimate bigint,
    copy_started timestamptz,
    copy_finished timestamptz,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_name, table_name)
);
-- The last error of the table's copy (NULL once a copy succeeds), for status.
ALTER TABLE londiste.table_info ADD COLUMN IF NOT EXISTS copy_error text;

CREATE TABLE IF NOT EXISTS londiste.seq_info (
    queue_name text NOT NULL REFERENCES londiste.node_info (queue_name) ON DELETE CASCADE,
    seq_name text NOT NULL,
    local boolean NOT NULL DEFAULT true,
    last_value bigint,
    PRIMARY KEY (queue_name, seq_name)
);

CREATE OR REPLACE FUNCTION londiste.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '3.8-rs'::text $$;

-- Pushes a sequence forward to at least i_value (never back).
CREATE OR REPLACE FUNCTION londiste.seq_push(i_seq regclass, i_value bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE cur bigint;
BEGIN
    EXECUTE format('SELECT last_value FROM %s', i_seq) INTO cur;
    IF cur < i_value THEN
        PERFORM setval(i_seq, i_value);
        RETURN i_value;
    END IF;
    RETURN cur;
END $$;

-- Root: publish sequence values ahead of use. When a sequence gets within i_buffer
-- of the last published value, publish value + 3 * i_buffer, so subscribers are
-- always ahead of the root and a cut-over cannot hand out a used id.
CREATE OR REPLACE FUNCTION londiste.root_check_seqs(i_queue_name text, i_buffer bigint DEFAULT 10000) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    cur bigint;
    n int4 := 0;
BEGIN
    FOR s IN SELECT seq_name, last_value FROM londiste.seq_info WHERE queue_name = i_queue_name AND local FOR UPDATE LOOP
        IF to_regclass(s.seq_name) IS NULL THEN
            CONTINUE;
        END IF;
        EXECUTE format('SELECT last_value FROM %s', s.seq_name) INTO cur;
        IF s.last_value IS NULL OR cur + i_buffer >= s.last_value THEN
            UPDATE londiste.seq_info SET last_value = cur + 3 * i_buffer
             WHERE queue_name = i_queue_name AND seq_name = s.seq_name;
            PERFORM pgq.insert_event(i_queue_name, 'londiste.update-seq', (cur + 3 * i_buffer)::text, s.seq_name, NULL, NULL, NULL);
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION londiste.periodic_maintenance() RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE q record;
BEGIN
    FOR q IN SELECT queue_name FROM londiste.node_info WHERE node_type = 'root' LOOP
        PERFORM londiste.root_check_seqs(q.queue_name);
    END LOOP;
    RETURN 0;
END $$;

-- Tables of the local database that could be replicated but are not yet added.
CREATE OR REPLACE FUNCTION londiste.local_show_missing(i_queue_name text, OUT obj_kind text, OUT obj_name text)
RETURNS SETOF record LANGUAGE sql STABLE AS $$
    SELECT CASE c.relkind WHEN 'S' THEN 'S' ELSE 'r' END,
           quote_ident(n.nspname) || '.' || quote_ident(c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p', 'S')
       AND NOT c.relispartition
       AND n.nspname NOT IN ('pgq', 'londiste', 'pg_catalog', 'information_schema')
       AND n.nspname NOT LIKE 'pg\_%'
       AND NOT EXISTS (SELECT 1 FROM londiste.table_info t
                        WHERE t.queue_name = i_queue_name
                          AND t.table_name = quote_ident(n.nspname) || '.' || quote_ident(c.relname))
       AND NOT EXISTS (SELECT 1 FROM londiste.seq_info s
                        WHERE s.queue_name = i_queue_name
                          AND s.seq_name = quote_ident(n.nspname) || '.' || quote_ident(c.relname))
     ORDER BY 1, 2
$$;

-- Foreign keys to and from a table being copied are dropped for the copy (a COPY
-- or TRUNCATE would trip over or cascade through them) and restored, NOT VALID
-- then VALIDATE, once every table of the node is in sync.
CREATE TABLE IF NOT EXISTS londiste.pending_fkeys (
    from_table text NOT NULL,
    fkey_name text NOT NULL,
    fkey_def text NOT NULL,
    dropped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (from_table, fkey_name)
);

-- The keys put back, for the fkeys command: one row per key, its last restore.
CREATE TABLE IF NOT EXISTS londiste.restored_fkeys (
    from_table text NOT NULL,
    fkey_name text NOT NULL,
    fkey_def text NOT NULL,
    dropped_at timestamptz NOT NULL,
    restored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (from_table, fkey_name)
);

CREATE OR REPLACE FUNCTION londiste.drop_table_fkeys(i_table regclass) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    fk record;
    n int4 := 0;
BEGIN
    FOR fk IN SELECT c.conrelid::regclass::text AS from_table, c.conname::text AS name, pg_get_constraintdef(c.oid) AS def
                FROM pg_constraint c
               WHERE c.contype = 'f' AND (c.conrelid = i_table OR c.confrelid = i_table) LOOP
        INSERT INTO londiste.pending_fkeys (from_table, fkey_name, fkey_def) VALUES (fk.from_table, fk.name, fk.def)
        ON CONFLICT (from_table, fkey_name) DO UPDATE SET fkey_def = EXCLUDED.fkey_def;
        -- IF EXISTS: a parallel copy of the other table may have just dropped it.
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', fk.from_table, fk.name);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION londiste.restore_table_fkey(i_from_table text, i_name text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE fk londiste.pending_fkeys;
BEGIN
    SELECT * INTO fk FROM londiste.pending_fkeys WHERE from_table = i_from_table AND fkey_name = i_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF to_regclass(fk.from_table) IS NOT NULL THEN
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID', fk.from_table, fk.fkey_name, fk.fkey_def);
        EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', fk.from_table, fk.fkey_name);
    END IF;
    DELETE FROM londiste.pending_fkeys WHERE from_table = i_from_table AND fkey_name = i_name;
    INSERT INTO londiste.restored_fkeys (from_table, fkey_name, fkey_def, dropped_at)
    VALUES (fk.from_table, fk.fkey_name, fk.fkey_def, fk.dropped_at)
    ON CONFLICT (from_table, fkey_name) DO UPDATE
       SET fkey_def = EXCLUDED.fkey_def, dropped_at = EXCLUDED.dropped_at, restored_at = now();
    RETURN 1;
END $$;

-- Replicated tables on branches and leaves refuse local writes: they would be
-- silently overwritten or diverge. The worker (londiste.replay = on, or replica
-- mode) passes; so does a session that sets londiste.replay itself, on purpose.
CREATE OR REPLACE FUNCTION londiste.deny_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('londiste.replay', true), '') = 'on'
       OR current_setting('session_replication_role') <> 'origin' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'table %.% is replicated into this node from queue % (% refused)', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0], TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'write on the root node; to change the replica on purpose, SET londiste.replay = on first';
END $$;

CREATE OR REPLACE FUNCTION londiste.deny_trigger_name(i_queue_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT left('_londiste_deny_' || i_queue_name, 63) $$;

-- A partitioned table's partitions (every level) get the trigger too: a
-- statement naming a partition fires only the partition's statement triggers.
CREATE OR REPLACE FUNCTION londiste.deny_create(i_queue_name text, i_table regclass) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE part record;
BEGIN
    PERFORM londiste.deny_drop(i_queue_name, i_table);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE %s londiste.deny_trigger(%L)',
                   londiste.deny_trigger_name(i_queue_name), i_table, pgq._trigger_exec(), i_queue_name);
    FOR part IN SELECT i.inhrelid::regclass AS rel FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
                 WHERE i.inhparent = i_table AND c.relkind = 'p' LOOP
        PERFORM londiste.deny_create(i_queue_name, part.rel);
    END LOOP;
    RETURN londiste.deny_trigger_name(i_queue_name);
END $$;

CREATE OR REPLACE FUNCTION londiste.deny_drop(i_queue_name text, i_table regclass) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    n int4 := 0;
BEGIN
    FOR part IN SELECT i.inhrelid::regclass AS rel FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
                 WHERE i.inhparent = i_table AND c.relkind = 'p' LOOP
        n := n + londiste.deny_drop(i_queue_name, part.rel);
    END LOOP;
    PERFORM 1 FROM pg_trigger WHERE tgrelid = i_table AND tgname = londiste.deny_trigger_name(i_queue_name);
    IF FOUND THEN
        EXECUTE format('DROP TRIGGER %I ON %s', londiste.deny_trigger_name(i_queue_name), i_table);
        n := n + 1;
    END IF;
    RETURN n;
END $$;

-- Re-creates the capture triggers of every table added on a root, after an
-- upgrade changed how they are generated.
CREATE OR REPLACE FUNCTION londiste.regenerate_capture() RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    n int4 := 0;
BEGIN
    FOR t IN SELECT ti.queue_name, ti.table_name, ti.key_columns
               FROM londiste.table_info ti JOIN londiste.node_info ni ON ni.queue_name = ti.queue_name
              WHERE ni.node_type = 'root' AND ti.local
                AND EXISTS (SELECT 1 FROM pg_trigger g
                             WHERE g.tgrelid = to_regclass(ti.table_name)
                               AND g.tgname LIKE '\_pgq\_%\_ins') LOOP
        PERFORM pgq.capture_create(t.queue_name, t.table_name::regclass, t.key_columns, 'capture');
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;
