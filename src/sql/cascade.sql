-- londiste-rs: the cut-over (takeover) and the cascade commands' state changes.
--
-- Each step of a takeover is one transaction on one node, made by one function
-- here, so a crash leaves every node either before or after a step, and every
-- function is idempotent so that re-running the command finishes the job:
--   fence_root    (old root)  writes to its tables refused, its last tick taken;
--   promote_root  (new root)  capture on, deny triggers off, queue ticking;
--   demote_root   (old root)  becomes a branch of the new root at the last tick.
-- Between fence and promote no node accepts writes; after promote only the new
-- root does. Tick ids are the same on every node of a queue, so a position on
-- one queue-carrying node is a position on any other.

ALTER TABLE londiste.node_info ADD COLUMN IF NOT EXISTS fenced_to text;
ALTER TABLE londiste.node_info ADD COLUMN IF NOT EXISTS fence_tick bigint;
-- The event sequence at the last applied tick: two nodes at different ticks with
-- the same value applied the same events (the ticks between were empty).
ALTER TABLE londiste.node_info ADD COLUMN IF NOT EXISTS last_tick_seq bigint;
-- On survivors of a failover: the dead node and the tick the new root started at.
ALTER TABLE londiste.node_location ADD COLUMN IF NOT EXISTS failover_tick bigint;

-- The fence: a statement trigger like the replicas' deny trigger, that names the
-- node the table moved to. BEFORE STATEMENT, so nothing is captured either.
CREATE OR REPLACE FUNCTION londiste.fence_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('londiste.replay', true), '') = 'on'
       OR current_setting('session_replication_role') <> 'origin' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'table %.% moved to node "%"; connect there (% refused)', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[1], TG_OP
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = format('queue %s is now written on node %s', TG_ARGV[0], TG_ARGV[1]);
END $$;

-- Puts the fence trigger on a table, replacing a deny trigger (same name).
-- EXECUTE PROCEDURE: the spelling every supported major accepts.
-- A partitioned table's partitions are fenced too (writes may name them).
CREATE OR REPLACE FUNCTION londiste.fence_create(i_queue_name text, i_table regclass, i_moved_to text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE part record;
BEGIN
    PERFORM londiste.deny_drop(i_queue_name, i_table);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE PROCEDURE londiste.fence_trigger(%L, %L)',
                   londiste.deny_trigger_name(i_queue_name), i_table, i_queue_name, i_moved_to);
    FOR part IN SELECT i.inhrelid::regclass AS rel FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
                 WHERE i.inhparent = i_table AND c.relkind = 'p' LOOP
        PERFORM londiste.fence_create(i_queue_name, part.rel, i_moved_to);
    END LOOP;
END $$;

-- The local tables of a queue, in a fixed order (lock order for the fence).
CREATE OR REPLACE FUNCTION londiste._local_tables(i_queue_name text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT table_name FROM londiste.table_info
     WHERE queue_name = i_queue_name AND local AND to_regclass(table_name) IS NOT NULL
     ORDER BY table_name
$$;

-- Locks every replicated table against writers (SHARE ROW EXCLUSIVE: what
-- CREATE TRIGGER takes). Tables are locked one at a time, so an application
-- transaction that holds one table and waits for another that is already locked
-- here would deadlock with us; each attempt therefore waits a short, growing
-- time (lock_timeout), gives all its locks back on failure (the subtransaction
-- rolls back) and retries with the table it could not get first: that is the
-- table the application takes first, so the next order matches the
-- application's. Writers wait at most one attempt; none gets an error.
CREATE OR REPLACE FUNCTION londiste._fence_lock(i_queue_name text, i_total interval) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    tabs text[];
    cur text;
    wait_ms int4 := 20;
    deadline timestamptz := clock_timestamp() + i_total;
    attempt int4 := 0;
BEGIN
    SELECT array_agg(t) INTO tabs FROM londiste._local_tables(i_queue_name) t;
    IF tabs IS NULL THEN
        RETURN 0;
    END IF;
    LOOP
        attempt := attempt + 1;
        BEGIN
            PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
            FOREACH cur IN ARRAY tabs LOOP
                EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', cur::regclass);
            END LOOP;
            RETURN attempt;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() > deadline THEN
                RAISE EXCEPTION 'could not lock table % against writers within % (% attempts): a transaction holds it', cur, i_total, attempt
                    USING ERRCODE = 'lock_not_available';
            END IF;
            tabs := array_prepend(cur, array_remove(tabs, cur));
            wait_ms := least(wait_ms * 2, 1000);
        END;
    END LOOP;
END $$;

-- On the root: queue a londiste.member event with what this node's member
-- table says of a node; subscribers' workers record it (replication/batch.rs).
CREATE OR REPLACE FUNCTION londiste.announce_member(i_queue_name text, i_node text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgq.insert_event(i_queue_name, 'londiste.member', node_name, node_location, node_type,
                            provider_node, CASE WHEN dead THEN 't' ELSE 'f' END)
      FROM londiste.node_location WHERE queue_name = i_queue_name AND node_name = i_node
$$;

-- Step 1, on the old root: refuse writes to every replicated table (after the
-- locks above: new writers wait for this transaction, then get the error), stop
-- its ticker and producers, and take the last tick. Every transaction that
-- committed a change before the fence is in a batch up to that tick; none can
-- commit one after it. Returns the tick.
DROP FUNCTION IF EXISTS londiste.fence_root(text, text);
CREATE OR REPLACE FUNCTION londiste.fence_root(i_queue_name text, i_new_node text, i_lock_wait interval DEFAULT '3s') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n londiste.node_info;
    q pgq.queue;
    t text;
    tick bigint;
BEGIN
    SELECT * INTO n FROM londiste.node_info WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this database is not a node of queue %', i_queue_name;
    END IF;
    IF n.fenced_to IS NOT NULL THEN
        IF n.fenced_to <> i_new_node THEN
            RAISE EXCEPTION 'node % is already handing over to node %; finish that takeover first', n.node_name, n.fenced_to;
        END IF;
        RETURN n.fence_tick;
    END IF;
    IF n.node_type <> 'root' THEN
        RAISE EXCEPTION 'node % is not the root of queue % (it is a %)', n.node_name, i_queue_name, n.node_type;
    END IF;
    PERFORM londiste._fence_lock(i_queue_name, i_lock_wait);
    FOR t IN SELECT * FROM londiste._local_tables(i_queue_name) LOOP
        PERFORM londiste.fence_create(i_queue_name, t::regclass, i_new_node);
    END LOOP;
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name FOR UPDATE;
    UPDATE pgq.queue SET queue_external_ticker = true, queue_disable_insert = true
     WHERE queue_id = q.queue_id;
    -- Unconditional: the new root must reach exactly this tick.
    tick := nextval(q.queue_tick_seq);
    INSERT INTO pgq.tick (tick_queue, tick_id, tick_event_seq, tick_snapshot)
    VALUES (q.queue_id, tick, pgq._seq_last(q.queue_event_seq), pgq._tick_snapshot());
    UPDATE londiste.node_info SET fenced_to = i_new_node, fence_tick = tick WHERE queue_name = i_queue_name;
    PERFORM pg_notify('pgq_tick', i_queue_name);
    RETURN tick;
END $$;

-- Undoes a fence that no node was promoted after (takeover --abort): the tables
-- take writes again and the queue ticks. The caller has checked that the node it
-- was handing over to is not a root.
CREATE OR REPLACE FUNCTION londiste.unfence_root(i_queue_name text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    n londiste.node_info;
    t text;
BEGIN
    SELECT * INTO n FROM londiste.node_info WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND OR n.node_type <> 'root' OR n.fenced_to IS NULL THEN
        RETURN 0;
    END IF;
    FOR t IN SELECT * FROM londiste._local_tables(i_queue_name) LOOP
        PERFORM londiste.deny_drop(i_queue_name, t::regclass);
    END LOOP;
    UPDATE pgq.queue SET queue_external_ticker = false, queue_disable_insert = false
     WHERE queue_name = i_queue_name;
    UPDATE londiste.node_info SET fenced_to = NULL, fence_tick = NULL WHERE queue_name = i_queue_name;
    RETURN 1;
END $$;

-- Step 2, on the new root, once its worker has applied i_tick: make it the root.
-- A leaf gets the queue a root needs, starting at i_tick; a branch's queue keeps
-- its ticks, and the last one gets a real snapshot of this database (the copied
-- ticks only say "everything up to the worker's transaction"; a transaction of
-- this database that got its xid earlier and writes after the promotion would
-- otherwise count as already delivered). Sequences are moved to at least the old
-- root's values plus i_margin. i_old_worker, when given, is registered at i_tick
-- so the old root can follow this node from exactly there.
CREATE OR REPLACE FUNCTION londiste.promote_root(i_queue_name text, i_tick bigint, i_old_node text,
                                                 i_old_worker text, i_seqs text[], i_values bigint[],
                                                 i_margin bigint) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    n londiste.node_info;
    q pgq.queue;
    t record;
    i int4;
    cur bigint;
BEGIN
    SELECT * INTO n FROM londiste.node_info WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this database is not a node of queue %', i_queue_name;
    END IF;
    IF n.node_type = 'root' THEN
        RETURN 0;
    END IF;
    IF n.last_tick_id IS DISTINCT FROM i_tick THEN
        RAISE EXCEPTION 'node % is at tick %, not at the handover tick %', n.node_name, n.last_tick_id, i_tick;
    END IF;
    PERFORM pgq.create_queue(i_queue_name);
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name FOR UPDATE;
    IF n.node_type = 'leaf' THEN
        DELETE FROM pgq.tick WHERE tick_queue = q.queue_id;
        INSERT INTO pgq.tick (tick_queue, tick_id, tick_event_seq, tick_snapshot)
        VALUES (q.queue_id, i_tick, 0, pgq._tick_snapshot());
    ELSE
        UPDATE pgq.tick SET tick_snapshot = pgq._tick_snapshot()
         WHERE tick_queue = q.queue_id AND tick_id = i_tick;
        IF NOT FOUND THEN
            INSERT INTO pgq.tick (tick_queue, tick_id, tick_event_seq, tick_snapshot)
            VALUES (q.queue_id, i_tick, pgq._seq_last(q.queue_event_seq), pgq._tick_snapshot());
        END IF;
        DELETE FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id > i_tick;
    END IF;
    PERFORM pgq.seq_setval(q.queue_tick_seq, i_tick);
    UPDATE pgq.queue SET queue_external_ticker = false, queue_disable_insert = false
     WHERE queue_id = q.queue_id;
    -- The trigger DDL below takes each table in turn; an application writing
    -- here already (it was refused a moment ago) would deadlock with it and
    -- wait deadlock_timeout (1 s) for the detector: lock them all first, the
    -- way the fence does. Readers only wait for the DROP TRIGGERs' instant.
    PERFORM londiste._fence_lock(i_queue_name, '3s');
    FOR t IN SELECT ti.table_name, ti.key_columns FROM londiste.table_info ti
              WHERE ti.queue_name = i_queue_name AND ti.local AND to_regclass(ti.table_name) IS NOT NULL
              ORDER BY ti.table_name LOOP
        PERFORM londiste.deny_drop(i_queue_name, t.table_name::regclass);
        PERFORM pgq.capture_create(i_queue_name, t.table_name::regclass, t.key_columns, 'capture');
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(i_seqs, 1), 0) LOOP
        IF to_regclass(i_seqs[i]) IS NOT NULL AND i_values[i] IS NOT NULL THEN
            EXECUTE format('SELECT last_value FROM %s', i_seqs[i]::regclass) INTO cur;
            IF cur < i_values[i] + i_margin THEN
                PERFORM setval(i_seqs[i]::regclass, i_values[i] + i_margin);
            END IF;
        END IF;
    END LOOP;
    UPDATE londiste.seq_info SET last_value = NULL WHERE queue_name = i_queue_name;
    UPDATE londiste.node_info SET node_type = 'root', provider_node = NULL, provider_location = NULL,
           paused = false, cur_error = NULL, error_time = NULL, fenced_to = NULL, fence_tick = NULL
     WHERE queue_name = i_queue_name;
    UPDATE londiste.node_location SET node_type = 'root', provider_node = NULL
     WHERE queue_name = i_queue_name AND node_name = n.node_name;
    IF i_old_node IS NOT NULL THEN
        UPDATE londiste.node_location SET node_type = 'branch', provider_node = n.node_name
         WHERE queue_name = i_queue_name AND node_name = i_old_node;
    END IF;
    IF i_old_worker IS NOT NULL THEN
        PERFORM pgq.register_consumer_at(i_queue_name, i_old_worker, i_tick);
    END IF;
    -- Every member learns the new tree through the queue.
    PERFORM londiste.announce_member(i_queue_name, node_name)
       FROM londiste.node_location WHERE queue_name = i_queue_name AND node_name IN (n.node_name, i_old_node);
    PERFORM pg_notify('pgq_tick', i_queue_name);
    RETURN 1;
END $$;

-- Step 3, on the old root: a branch of the new root from i_tick on. Its tables
-- keep the fence (applications write on the new root); capture is removed, the
-- queue is fed by the worker only. i_new_worker (the new root's worker, which
-- read this queue) is unregistered.
CREATE OR REPLACE FUNCTION londiste.demote_root(i_queue_name text, i_new_node text, i_new_location text,
                                                i_tick bigint, i_new_worker text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    n londiste.node_info;
    t text;
BEGIN
    SELECT * INTO n FROM londiste.node_info WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this database is not a node of queue %', i_queue_name;
    END IF;
    IF n.node_type <> 'root' THEN
        RETURN 0;
    END IF;
    PERFORM londiste._fence_lock(i_queue_name, '3s');
    FOR t IN SELECT * FROM londiste._local_tables(i_queue_name) LOOP
        PERFORM pgq.capture_drop(i_queue_name, t::regclass);
        PERFORM londiste.fence_create(i_queue_name, t::regclass, i_new_node);
    END LOOP;
    UPDATE pgq.queue SET queue_external_ticker = true, queue_disable_insert = true
     WHERE queue_name = i_queue_name;
    IF i_new_worker IS NOT NULL THEN
        PERFORM pgq.unregister_consumer(i_queue_name, i_new_worker)
          FROM pgq.subscription s JOIN pgq.consumer c ON c.co_id = s.sub_consumer
          JOIN pgq.queue qq ON qq.queue_id = s.sub_queue
         WHERE qq.queue_name = i_queue_name AND c.co_name = i_new_worker;
    END IF;
    UPDATE londiste.node_info SET node_type = 'branch', provider_node = i_new_node,
           provider_location = i_new_location, last_tick_id = i_tick, fenced_to = NULL,
           fence_tick = NULL, cur_error = NULL, error_time = NULL
     WHERE queue_name = i_queue_name;
    UPDATE londiste.node_location SET node_type = 'branch', provider_node = i_new_node
     WHERE queue_name = i_queue_name AND node_name = n.node_name;
    UPDATE londiste.node_location SET node_type = 'root', provider_node = NULL
     WHERE queue_name = i_queue_name AND node_name = i_new_node;
    RETURN 1;
END $$;

-- Sequences an added table's columns own (serial, identity): registered with the
-- table so that a cut-over brings them along.
CREATE OR REPLACE FUNCTION londiste.owned_sequences(i_table regclass) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT quote_ident(n.nspname) || '.' || quote_ident(s.relname)
      FROM pg_depend d
      JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
      JOIN pg_namespace n ON n.oid = s.relnamespace
     WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
       AND d.refobjid = i_table AND d.deptype IN ('a', 'i')
$$;

-- The values a takeover carries to the new root: every sequence the queue
-- replicates, and those the replicated tables' columns own even if they were not
-- added (a serial column's sequence left behind would hand out used ids).
CREATE OR REPLACE FUNCTION londiste.seq_values(i_queue_name text, OUT seq_name text, OUT last_value bigint)
RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE
    s text;
BEGIN
    FOR s IN SELECT si.seq_name FROM londiste.seq_info si WHERE si.queue_name = i_queue_name AND si.local
             UNION
             SELECT o FROM londiste._local_tables(i_queue_name) t, londiste.owned_sequences(t::regclass) o LOOP
        IF to_regclass(s) IS NOT NULL THEN
            seq_name := s;
            EXECUTE format('SELECT last_value FROM %s', s::regclass) INTO last_value;
            RETURN NEXT;
        END IF;
    END LOOP;
END $$;

-- drop-node, on the node itself: its triggers, node state, members and queue.
CREATE OR REPLACE FUNCTION londiste.drop_local_node(i_queue_name text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT * FROM londiste._local_tables(i_queue_name) LOOP
        PERFORM pgq.capture_drop(i_queue_name, t::regclass);
        PERFORM londiste.deny_drop(i_queue_name, t::regclass);
    END LOOP;
    DELETE FROM londiste.node_info WHERE queue_name = i_queue_name;
    DELETE FROM londiste.node_location WHERE queue_name = i_queue_name;
    PERFORM pgq.drop_queue(queue_name, true) FROM pgq.queue WHERE queue_name = i_queue_name;
    RETURN 1;
END $$;
