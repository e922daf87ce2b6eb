-- londiste-rs: the PgQ queue layer in plain SQL and PL/pgSQL.
--
-- Public functions keep Skytools 3 PgQ's names, arguments and result columns so that
-- existing consumers and monitoring queries keep working. Nothing here needs a
-- superuser or a C extension: a role with CREATE on the database installs it.
-- The script is idempotent (CREATE ... IF NOT EXISTS, CREATE OR REPLACE) so that
-- installing twice is a no-op and a newer binary upgrades in place; the installer
-- (src/install.rs) runs it in one transaction under an advisory lock.

CREATE SCHEMA IF NOT EXISTS pgq;

-- Supported servers: PostgreSQL 10 to 18. Where they differ (see the version
-- table in README.md) the code asks the server which one it is, here, and
-- builds version-specific statements with dynamic EXECUTE.
CREATE OR REPLACE FUNCTION pgq._server_version() RETURNS int4
LANGUAGE sql STABLE AS $$ SELECT current_setting('server_version_num')::int4 $$;

-- CREATE TRIGGER ... EXECUTE FUNCTION is 11+; 10 knows only the (later
-- deprecated) spelling EXECUTE PROCEDURE.
CREATE OR REPLACE FUNCTION pgq._trigger_exec() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pgq._server_version() >= 110000 THEN 'FUNCTION' ELSE 'PROCEDURE' END
$$;

CREATE TABLE IF NOT EXISTS pgq.schema_info (
    component text PRIMARY KEY,
    version int4 NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS pgq.queue (
    queue_id serial PRIMARY KEY,
    queue_name text NOT NULL UNIQUE,
    queue_ntables int4 NOT NULL DEFAULT 3,
    queue_cur_table int4 NOT NULL DEFAULT 0,
    queue_rotation_period interval NOT NULL DEFAULT '2 hours',
    queue_switch_step1 bigint NOT NULL DEFAULT txid_current(),
    queue_switch_step2 bigint DEFAULT txid_current(),
    queue_switch_time timestamptz NOT NULL DEFAULT now(),
    queue_external_ticker boolean NOT NULL DEFAULT false,
    queue_disable_insert boolean NOT NULL DEFAULT false,
    queue_ticker_paused boolean NOT NULL DEFAULT false,
    queue_ticker_max_count int4 NOT NULL DEFAULT 500,
    -- Skytools ticks after 3 s; we tick as soon as the ticker sees events, so that
    -- replication lag is bounded by the ticker period rather than by this value.
    queue_ticker_max_lag interval NOT NULL DEFAULT '0',
    queue_ticker_idle_period interval NOT NULL DEFAULT '1 minute',
    queue_per_tx_limit int4,
    queue_data_pfx text NOT NULL,
    queue_event_seq text NOT NULL,
    queue_tick_seq text NOT NULL,
    queue_extra_maint text[]
);

CREATE TABLE IF NOT EXISTS pgq.consumer (
    co_id serial PRIMARY KEY,
    co_name text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS pgq.subscription (
    sub_id serial NOT NULL,
    sub_queue int4 NOT NULL REFERENCES pgq.queue (queue_id),
    sub_consumer int4 NOT NULL REFERENCES pgq.consumer (co_id),
    sub_last_tick bigint,
    sub_active timestamptz NOT NULL DEFAULT now(),
    sub_batch bigint UNIQUE,
    sub_next_tick bigint,
    PRIMARY KEY (sub_queue, sub_consumer)
);

CREATE TABLE IF NOT EXISTS pgq.tick (
    tick_queue int4 NOT NULL REFERENCES pgq.queue (queue_id),
    tick_id bigint NOT NULL,
    tick_time timestamptz NOT NULL DEFAULT now(),
    tick_snapshot txid_snapshot NOT NULL DEFAULT txid_current_snapshot(),
    tick_event_seq bigint NOT NULL,
    PRIMARY KEY (tick_queue, tick_id)
);

CREATE SEQUENCE IF NOT EXISTS pgq.batch_id_seq;

CREATE TABLE IF NOT EXISTS pgq.event_template (
    ev_id bigint NOT NULL,
    ev_time timestamptz NOT NULL,
    ev_txid bigint NOT NULL DEFAULT txid_current(),
    ev_owner int4,
    ev_retry int4,
    ev_type text,
    ev_data text,
    ev_extra1 text,
    ev_extra2 text,
    ev_extra3 text,
    ev_extra4 text
);

CREATE TABLE IF NOT EXISTS pgq.retry_queue (
    ev_retry_after timestamptz NOT NULL,
    ev_queue int4 NOT NULL,
    LIKE pgq.event_template,
    PRIMARY KEY (ev_owner, ev_id)
);
CREATE INDEX IF NOT EXISTS rq_retry_idx ON pgq.retry_queue (ev_retry_after);

-- ---------------------------------------------------------------------------------
-- Small helpers
-- ---------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgq.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '3.5.2'::text $$;

-- PgQ's seq_getval: the sequence's last_value, which for a fresh sequence is
-- its start value although nothing was handed out yet.
CREATE OR REPLACE FUNCTION pgq.seq_getval(i_seq_name text) RETURNS bigint
LANGUAGE plpgsql STRICT AS $$
DECLARE res bigint;
BEGIN
    EXECUTE format('SELECT last_value FROM %s', pgq.quote_fqname(i_seq_name)) INTO res;
    RETURN res;
END $$;

-- The last value handed out: a fresh sequence (not yet called) has handed out
-- none, so an empty queue has no "new events", and the first event of a queue
-- counts as new (with seq_getval's value it would not, and the ticker would
-- wait for the idle period before ticking it).
CREATE OR REPLACE FUNCTION pgq._seq_last(i_seq_name text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE res bigint;
BEGIN
    EXECUTE format('SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM %s', i_seq_name) INTO res;
    RETURN res;
END $$;

-- Moves a sequence forward only, never back (a sequence that went backwards could
-- hand out an id that is already used).
CREATE OR REPLACE FUNCTION pgq.seq_setval(i_seq_name text, i_new_value bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE cur bigint;
BEGIN
    cur := pgq._seq_last(i_seq_name);
    IF cur < i_new_value THEN
        PERFORM setval(i_seq_name, i_new_value);
        RETURN i_new_value;
    END IF;
    RETURN cur;
END $$;

CREATE OR REPLACE FUNCTION pgq.quote_fqname(i_name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE pos int;
BEGIN
    pos := strpos(i_name, '.');
    IF pos > 0 THEN
        RETURN quote_ident(substr(i_name, 1, pos - 1)) || '.' || quote_ident(substr(i_name, pos + 1));
    END IF;
    RETURN quote_ident(i_name);
END $$;

CREATE OR REPLACE FUNCTION pgq._queue(i_queue_name text) RETURNS pgq.queue
LANGUAGE plpgsql STABLE AS $$
DECLARE q pgq.queue;
BEGIN
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Unknown queue: %', i_queue_name USING ERRCODE = 'undefined_object';
    END IF;
    RETURN q;
END $$;

-- ---------------------------------------------------------------------------------
-- Queue administration
-- ---------------------------------------------------------------------------------

-- A multi-row event's data is large (about 100 kB for 1000 rows): compress it
-- with lz4 where the server has it, else store it uncompressed. The default
-- (pglz) cost a quarter of the capture time of a bulk insert.
CREATE OR REPLACE FUNCTION pgq._tune_event_storage(i_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE format('ALTER TABLE %s ALTER COLUMN ev_data SET COMPRESSION lz4', i_table);
    EXCEPTION WHEN OTHERS THEN
        EXECUTE format('ALTER TABLE %s ALTER COLUMN ev_data SET STORAGE EXTERNAL', i_table);
    END;
END $$;

-- The snapshot a tick records. A transaction's own xid is never in its snapshot's
-- xip, so a tick made in a transaction that already wrote events (create_queue or
-- a tick in the writer's own transaction) would count those events as done before
-- the tick, and no batch would hold them. List our own xid as still running.
CREATE OR REPLACE FUNCTION pgq._tick_snapshot() RETURNS txid_snapshot
LANGUAGE plpgsql AS $$
DECLARE
    s txid_snapshot := txid_current_snapshot();
    me bigint := txid_current_if_assigned();
BEGIN
    IF me IS NULL OR me >= txid_snapshot_xmax(s) THEN
        RETURN s;
    END IF;
    RETURN (least(txid_snapshot_xmin(s), me)::text || ':' || txid_snapshot_xmax(s)::text || ':'
            || (SELECT string_agg(x::text, ',' ORDER BY x)
                  FROM (SELECT txid_snapshot_xip(s) AS x UNION SELECT me) u))::txid_snapshot;
END $$;

CREATE OR REPLACE FUNCTION pgq.create_queue(i_queue_name text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    qid int4;
    pfx text;
    i int4;
BEGIN
    IF i_queue_name IS NULL OR i_queue_name = '' THEN
        RAISE EXCEPTION 'Invalid NULL or empty queue name';
    END IF;
    PERFORM 1 FROM pgq.queue WHERE queue_name = i_queue_name;
    IF FOUND THEN
        RETURN 0;
    END IF;
    qid := nextval(pg_get_serial_sequence('pgq.queue', 'queue_id'));
    pfx := 'pgq.event_' || qid;
    INSERT INTO pgq.queue (queue_id, queue_name, queue_data_pfx, queue_event_seq, queue_tick_seq)
    VALUES (qid, i_queue_name, pfx, pfx || '_id_seq', pfx || '_tick_seq');

    EXECUTE format('CREATE SEQUENCE %s_id_seq', pfx);
    EXECUTE format('CREATE SEQUENCE %s_tick_seq', pfx);
    EXECUTE format('CREATE TABLE %s () INHERITS (pgq.event_template)', pfx);
    FOR i IN 0 .. 2 LOOP
        -- Event tables are emptied by TRUNCATE at rotation, never by DELETE, so they
        -- need no vacuum; fillfactor 100 as nothing is ever updated.
        EXECUTE format('CREATE TABLE %s_%s () INHERITS (%s) WITH (fillfactor = 100, autovacuum_enabled = off, toast.autovacuum_enabled = off)', pfx, i, pfx);
        EXECUTE format('ALTER TABLE %s_%s ALTER COLUMN ev_id SET DEFAULT nextval(%L)', pfx, i, pfx || '_id_seq');
        EXECUTE format('ALTER TABLE %s_%s ALTER COLUMN ev_time SET DEFAULT now()', pfx, i);
        EXECUTE format('CREATE INDEX event_%s_%s_txid_idx ON %s_%s (ev_txid)', qid, i, pfx, i);
        PERFORM pgq._tune_event_storage(format('%s_%s', pfx, i)::regclass);
    END LOOP;
    -- The first tick: consumers register at it.
    INSERT INTO pgq.tick (tick_queue, tick_id, tick_event_seq, tick_snapshot)
    VALUES (qid, nextval(pfx || '_tick_seq'), 0, pgq._tick_snapshot());
    PERFORM pgq._regen_insert_event();
    -- The roles' rights on the new tables (pgq_grants.sql).
    PERFORM pgq._grant_queue(q) FROM pgq.queue q WHERE q.queue_id = qid;
    RETURN 1;
END $$;

CREATE OR REPLACE FUNCTION pgq.drop_queue(i_queue_name text, x_force boolean) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    tbl record;
    i int4;
BEGIN
    q := pgq._queue(i_queue_name);
    -- The ticker locks the same row: no tick can be added between deleting the
    -- ticks and deleting the queue.
    PERFORM 1 FROM pgq.queue WHERE queue_id = q.queue_id FOR UPDATE;
    IF EXISTS (SELECT 1 FROM pgq.subscription WHERE sub_queue = q.queue_id) THEN
        IF NOT x_force THEN
            RAISE EXCEPTION 'cannot drop queue %, consumers still attached', i_queue_name;
        END IF;
        DELETE FROM pgq.retry_queue WHERE ev_queue = q.queue_id;
        DELETE FROM pgq.subscription WHERE sub_queue = q.queue_id;
    END IF;
    -- Capture triggers that feed this queue go with it.
    FOR tbl IN SELECT t.tgrelid::regclass AS rel, t.tgname FROM pg_trigger t
               WHERE t.tgname LIKE '\_pgq\_' || q.queue_id || '\_%' LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', tbl.tgname, tbl.rel);
    END LOOP;
    FOR tbl IN SELECT p.oid::regprocedure AS fn FROM pg_proc p
               WHERE p.pronamespace = 'pgq'::regnamespace AND p.proname LIKE '\_cap\_' || q.queue_id || '\_%' LOOP
        EXECUTE format('DROP FUNCTION %s', tbl.fn);
    END LOOP;
    DELETE FROM pgq.tick WHERE tick_queue = q.queue_id;
    -- The event tables one by one (a CASCADE would say NOTICE for each).
    FOR i IN 0 .. q.queue_ntables - 1 LOOP
        EXECUTE format('DROP TABLE IF EXISTS %s_%s', q.queue_data_pfx, i);
    END LOOP;
    EXECUTE format('DROP TABLE %s CASCADE', q.queue_data_pfx);
    EXECUTE format('DROP SEQUENCE %s', q.queue_event_seq);
    EXECUTE format('DROP SEQUENCE %s', q.queue_tick_seq);
    DELETE FROM pgq.queue WHERE queue_id = q.queue_id;
    DELETE FROM pgq.consumer c WHERE NOT EXISTS (SELECT 1 FROM pgq.subscription s WHERE s.sub_consumer = c.co_id);
    PERFORM pgq._regen_insert_event();
    RETURN 1;
END $$;

CREATE OR REPLACE FUNCTION pgq.drop_queue(i_queue_name text) RETURNS int4
LANGUAGE sql AS $$ SELECT pgq.drop_queue(i_queue_name, false) $$;

CREATE OR REPLACE FUNCTION pgq.set_queue_config(x_queue_name text, x_param_name text, x_param_value text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE col text;
BEGIN
    PERFORM pgq._queue(x_queue_name);
    col := CASE WHEN x_param_name LIKE 'queue\_%' THEN x_param_name ELSE 'queue_' || x_param_name END;
    IF col NOT IN ('queue_ticker_max_count', 'queue_ticker_max_lag', 'queue_ticker_idle_period',
                   'queue_ticker_paused', 'queue_rotation_period', 'queue_external_ticker',
                   'queue_disable_insert', 'queue_per_tx_limit') THEN
        RAISE EXCEPTION 'cannot change parameter "%"', x_param_name;
    END IF;
    EXECUTE format('UPDATE pgq.queue SET %I = %L WHERE queue_name = %L', col, x_param_value, x_queue_name);
    RETURN 1;
END $$;

-- ---------------------------------------------------------------------------------
-- Producing events
-- ---------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgq.current_event_table(x_queue_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE q pgq.queue;
BEGIN
    q := pgq._queue(x_queue_name);
    IF q.queue_disable_insert AND current_setting('session_replication_role') <> 'replica'
       AND coalesce(current_setting('londiste.replay', true), '') <> 'on' THEN
        RAISE EXCEPTION 'Writing to queue disabled';
    END IF;
    RETURN q.queue_data_pfx || '_' || q.queue_cur_table;
END $$;

-- queue_per_tx_limit: the events a transaction wrote to a queue are counted in
-- a transaction-local setting (it reverts at commit, rollback, and with a
-- rolled-back subtransaction, so only events that can still commit count).
CREATE OR REPLACE FUNCTION pgq._count_tx_event(q pgq.queue) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'pgq.tx_events_' || q.queue_id;
    n int4 := coalesce(nullif(current_setting(name, true), ''), '0')::int4;
BEGIN
    IF n >= q.queue_per_tx_limit THEN
        RAISE EXCEPTION 'Queue ''%'' allows max % events from one TX', q.queue_name, q.queue_per_tx_limit;
    END IF;
    PERFORM set_config(name, (n + 1)::text, true);
END $$;

-- insert_event_raw is generated: one static INSERT per event table of every
-- queue, so each session plans them once (an EXECUTE per event re-planned its
-- INSERT every time: 1.5x slower). Regenerated when a queue is created or
-- dropped; a queue it does not know yet takes the dynamic path.
CREATE OR REPLACE FUNCTION pgq._regen_insert_event() RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    q record;
    branches text := '';
    cols text := '(ev_id, ev_time, ev_owner, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)';
    vals text := '(id, coalesce(ev_time, now()), ev_owner, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)';
    body text := $body$
CREATE OR REPLACE FUNCTION pgq.insert_event_raw(
    queue_name text, ev_id bigint, ev_time timestamptz, ev_owner int4, ev_retry int4,
    ev_type text, ev_data text, ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    q pgq.queue;
    id bigint;
BEGIN
    q := pgq._queue(queue_name);
    -- The id is taken before the checks, as PgQ does: a refused event still
    -- uses up its id.
    id := coalesce(ev_id, nextval(q.queue_event_seq));
    IF q.queue_disable_insert AND current_setting('session_replication_role') <> 'replica'
       AND coalesce(current_setting('londiste.replay', true), '') <> 'on' THEN
        RAISE EXCEPTION 'Insert into queue disallowed';
    END IF;
    IF q.queue_per_tx_limit IS NOT NULL THEN
        PERFORM pgq._count_tx_event(q);
    END IF;
    IF false THEN
        NULL;@BRANCHES@
    ELSE
        EXECUTE format('INSERT INTO %s_%s @COLS@ VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)',
                       q.queue_data_pfx, q.queue_cur_table)
            USING id, coalesce(ev_time, now()), ev_owner, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4;
    END IF;
    RETURN id;
END $fn$;
$body$;
BEGIN
    -- Two sessions replacing the function at once would fail ("tuple
    -- concurrently updated").
    PERFORM pg_advisory_xact_lock(hashtext('pgq._regen_insert_event'));
    FOR q IN SELECT queue_id, queue_data_pfx, queue_ntables FROM pgq.queue ORDER BY queue_id LOOP
        FOR i IN 0 .. q.queue_ntables - 1 LOOP
            branches := branches || format(E'\n    ELSIF q.queue_id = %s AND q.queue_cur_table = %s THEN\n        INSERT INTO %s_%s %s VALUES %s;',
                                           q.queue_id, i, q.queue_data_pfx, i, cols, vals);
        END LOOP;
    END LOOP;
    body := replace(replace(body, '@BRANCHES@', branches), '@COLS@', cols);
    BEGIN
        EXECUTE body;
    EXCEPTION WHEN insufficient_privilege THEN
        -- A role that may create queues but does not own the function: the
        -- dynamic path serves the new queue.
        NULL;
    END;
END $gen$;

SELECT pgq._regen_insert_event();

CREATE OR REPLACE FUNCTION pgq.insert_event(queue_name text, ev_type text, ev_data text,
    ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgq.insert_event_raw(queue_name, NULL, now(), NULL, NULL, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
$$;

CREATE OR REPLACE FUNCTION pgq.insert_event(queue_name text, ev_type text, ev_data text) RETURNS bigint
LANGUAGE sql AS $$ SELECT pgq.insert_event(queue_name, ev_type, ev_data, NULL, NULL, NULL, NULL) $$;

-- ---------------------------------------------------------------------------------
-- Ticker
-- ---------------------------------------------------------------------------------

-- Conditional tick: the decision rules are Skytools' (max_count, max_lag, idle
-- backoff). Ticks are serialised by the queue row lock, so several tickers on one
-- database are safe. Every tick is announced with NOTIFY pgq_tick, payload = queue
-- name, so that consumers wake at once instead of polling.
CREATE OR REPLACE FUNCTION pgq.ticker(i_queue_name text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
BEGIN
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Unknown queue: %', i_queue_name;
    END IF;
    IF q.queue_external_ticker THEN
        RAISE EXCEPTION 'This queue has external tick source.';
    END IF;
    IF q.queue_ticker_paused THEN
        RAISE EXCEPTION 'Ticker has been paused for this queue';
    END IF;
    RETURN pgq._tick(q);
END $$;

-- The tick decision for a queue whose row the caller has locked.
CREATE OR REPLACE FUNCTION pgq._tick(q pgq.queue) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last pgq.tick;
    prev_time timestamptz;
    cur_seq bigint;
    new_events bigint;
    lag interval;
    gap interval;
    res bigint;
    committed boolean;
BEGIN
    SELECT * INTO last FROM pgq.tick WHERE tick_queue = q.queue_id ORDER BY tick_id DESC LIMIT 1;
    IF FOUND THEN
        -- (Not txid_current(): that would give every ticker call an xid.)
        IF txid_snapshot_xmin(last.tick_snapshot) > txid_snapshot_xmax(txid_current_snapshot()) THEN
            RAISE EXCEPTION 'Invalid PgQ state: old xmin > cur txid (queue %); was the database restored from a dump into a new cluster?', q.queue_name;
        END IF;
        cur_seq := pgq._seq_last(q.queue_event_seq);
        new_events := cur_seq - last.tick_event_seq;
        lag := now() - last.tick_time;
        IF new_events > 0 THEN
            IF new_events < q.queue_ticker_max_count AND lag < q.queue_ticker_max_lag THEN
                RETURN NULL;
            END IF;
        ELSE
            IF lag < q.queue_ticker_max_lag / 2 THEN
                RETURN NULL;
            END IF;
            -- No new events, but events of a transaction that was still open at
            -- the last tick may have committed since (a long or large
            -- transaction): tick now rather than after the idle backoff.
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE ev_txid >= $1
                                             AND NOT txid_visible_in_snapshot(ev_txid, $2)
                                             AND txid_visible_in_snapshot(ev_txid, txid_current_snapshot()))',
                           q.queue_data_pfx)
                INTO committed USING txid_snapshot_xmin(last.tick_snapshot), last.tick_snapshot;
            IF NOT committed THEN
                SELECT tick_time INTO prev_time FROM pgq.tick
                 WHERE tick_queue = q.queue_id AND tick_id < last.tick_id
                 ORDER BY tick_id DESC LIMIT 1;
                gap := coalesce(last.tick_time - prev_time, '0');
                IF lag < q.queue_ticker_idle_period AND lag < 2 * gap THEN
                    RETURN NULL;
                END IF;
            END IF;
        END IF;
    ELSE
        cur_seq := pgq._seq_last(q.queue_event_seq);
    END IF;
    res := nextval(q.queue_tick_seq);
    INSERT INTO pgq.tick (tick_queue, tick_id, tick_event_seq, tick_snapshot)
    VALUES (q.queue_id, res, cur_seq, pgq._tick_snapshot());
    PERFORM pg_notify('pgq_tick', q.queue_name);
    RETURN res;
END $$;

-- External tick: branches copy their provider's ticks with the same id and position.
CREATE OR REPLACE FUNCTION pgq.ticker(i_queue_name text, i_tick_id bigint, i_orig_timestamp timestamptz, i_event_seq bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE q pgq.queue;
BEGIN
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Unknown queue: %', i_queue_name;
    END IF;
    IF NOT q.queue_external_ticker THEN
        RAISE EXCEPTION 'Queue % has internal ticker, external ticks not allowed', i_queue_name;
    END IF;
    IF q.queue_ticker_paused THEN
        RAISE EXCEPTION 'Ticker has been paused for this queue';
    END IF;
    -- Only the cascade worker writes to a queue with an external ticker, one
    -- transaction per batch, so the tick's snapshot is "everything up to and
    -- including this transaction": the events it just copied land in this batch,
    -- as on the provider, instead of sliding into the next one.
    INSERT INTO pgq.tick (tick_queue, tick_id, tick_time, tick_event_seq, tick_snapshot)
    VALUES (q.queue_id, i_tick_id, i_orig_timestamp, i_event_seq,
            ((txid_current() + 1)::text || ':' || (txid_current() + 1)::text || ':')::txid_snapshot)
    ON CONFLICT (tick_queue, tick_id) DO NOTHING;
    PERFORM pgq.seq_setval(q.queue_tick_seq, i_tick_id);
    PERFORM pgq.seq_setval(q.queue_event_seq, i_event_seq);
    PERFORM pg_notify('pgq_tick', i_queue_name);
    RETURN i_tick_id;
END $$;

CREATE OR REPLACE FUNCTION pgq.ticker() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    n bigint := 0;
BEGIN
    -- A queue locked by a drop_queue (which may wait on user tables) or by
    -- another ticker is skipped, not waited for: other queues and databases
    -- are due too.
    FOR q IN SELECT * FROM pgq.queue
              WHERE NOT queue_external_ticker AND NOT queue_ticker_paused
              ORDER BY queue_id FOR UPDATE SKIP LOCKED LOOP
        IF pgq._tick(q) IS NOT NULL THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END $$;

-- Makes the next ticker() call tick at once; returns the current last tick id.
CREATE OR REPLACE FUNCTION pgq.force_tick(i_queue_name text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    last bigint;
BEGIN
    q := pgq._queue(i_queue_name);
    SELECT tick_id INTO last FROM pgq.tick WHERE tick_queue = q.queue_id ORDER BY tick_id DESC LIMIT 1;
    PERFORM setval(q.queue_event_seq, nextval(q.queue_event_seq) + q.queue_ticker_max_count * 2 + 1000);
    RETURN last;
END $$;

-- ---------------------------------------------------------------------------------
-- Consumers
-- ---------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgq.register_consumer_at(x_queue_name text, x_consumer_name text, x_tick_pos bigint)
RETURNS int4 LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    cid int4;
    sub pgq.subscription;
BEGIN
    q := pgq._queue(x_queue_name);
    PERFORM 1 FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id = x_tick_pos;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cannot reposition, tick not found: %', x_tick_pos;
    END IF;
    INSERT INTO pgq.consumer (co_name) VALUES (x_consumer_name) ON CONFLICT (co_name) DO NOTHING;
    SELECT co_id INTO cid FROM pgq.consumer WHERE co_name = x_consumer_name;
    SELECT * INTO sub FROM pgq.subscription WHERE sub_queue = q.queue_id AND sub_consumer = cid FOR UPDATE;
    IF FOUND THEN
        UPDATE pgq.subscription SET sub_last_tick = x_tick_pos, sub_batch = NULL, sub_next_tick = NULL, sub_active = now()
         WHERE sub_queue = q.queue_id AND sub_consumer = cid;
        RETURN 0;
    END IF;
    INSERT INTO pgq.subscription (sub_queue, sub_consumer, sub_last_tick) VALUES (q.queue_id, cid, x_tick_pos);
    RETURN 1;
END $$;

CREATE OR REPLACE FUNCTION pgq.register_consumer(x_queue_name text, x_consumer_id text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    last bigint;
BEGIN
    q := pgq._queue(x_queue_name);
    PERFORM 1 FROM pgq.subscription s JOIN pgq.consumer c ON c.co_id = s.sub_consumer
     WHERE s.sub_queue = q.queue_id AND c.co_name = x_consumer_id;
    IF FOUND THEN
        RETURN 0;
    END IF;
    SELECT tick_id INTO last FROM pgq.tick WHERE tick_queue = q.queue_id ORDER BY tick_id DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'No ticks for this queue. Please run ticker on database.';
    END IF;
    RETURN pgq.register_consumer_at(x_queue_name, x_consumer_id, last);
END $$;

CREATE OR REPLACE FUNCTION pgq.unregister_consumer(x_queue_name text, x_consumer_name text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    sub pgq.subscription;
BEGIN
    q := pgq._queue(x_queue_name);
    SELECT s.* INTO sub FROM pgq.subscription s JOIN pgq.consumer c ON c.co_id = s.sub_consumer
     WHERE s.sub_queue = q.queue_id AND c.co_name = x_consumer_name FOR UPDATE OF s;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    DELETE FROM pgq.retry_queue WHERE ev_queue = q.queue_id AND ev_owner = sub.sub_id;
    DELETE FROM pgq.subscription WHERE sub_queue = q.queue_id AND sub_consumer = sub.sub_consumer;
    DELETE FROM pgq.consumer c WHERE c.co_id = sub.sub_consumer
       AND NOT EXISTS (SELECT 1 FROM pgq.subscription s WHERE s.sub_consumer = c.co_id);
    RETURN 1;
END $$;

-- The tick a batch would end at when it may span several ticks: the furthest tick
-- after i_prev_id that keeps the batch within i_max_events events (at least one tick),
-- or, with the Skytools-style minimums, the first tick that satisfies one of them.
CREATE OR REPLACE FUNCTION pgq.find_tick_helper(i_queue_id int4, i_prev_tick_id bigint,
    i_prev_tick_time timestamptz, i_prev_tick_seq bigint, i_min_count bigint, i_min_interval interval,
    OUT next_tick_id bigint, OUT next_tick_time timestamptz, OUT next_tick_seq bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    SELECT t.tick_id, t.tick_time, t.tick_event_seq INTO next_tick_id, next_tick_time, next_tick_seq
      FROM pgq.tick t
     WHERE t.tick_queue = i_queue_id AND t.tick_id > i_prev_tick_id
       AND ((i_min_count IS NOT NULL AND t.tick_event_seq - i_prev_tick_seq >= i_min_count)
         OR (i_min_interval IS NOT NULL AND t.tick_time - i_prev_tick_time >= i_min_interval))
     ORDER BY t.tick_id LIMIT 1;
END $$;

CREATE OR REPLACE FUNCTION pgq._next_batch(i_queue_name text, i_consumer_name text,
    i_min_lag interval, i_min_count int4, i_min_interval interval, i_max_events bigint,
    OUT batch_id bigint, OUT cur_tick_id bigint, OUT prev_tick_id bigint,
    OUT cur_tick_time timestamptz, OUT prev_tick_time timestamptz,
    OUT cur_tick_event_seq bigint, OUT prev_tick_event_seq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    sub pgq.subscription;
    prev pgq.tick;
    nxt pgq.tick;
BEGIN
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Not subscriber to queue: %/%', i_queue_name, i_consumer_name;
    END IF;
    SELECT s.* INTO sub FROM pgq.subscription s JOIN pgq.consumer c ON c.co_id = s.sub_consumer
     WHERE s.sub_queue = q.queue_id AND c.co_name = i_consumer_name FOR UPDATE OF s;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Not subscriber to queue: %/%', i_queue_name, i_consumer_name;
    END IF;
    SELECT * INTO prev FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id = sub.sub_last_tick;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'PgQ corruption: Consumer % on queue % does not see tick %', i_consumer_name, i_queue_name, sub.sub_last_tick;
    END IF;
    IF sub.sub_batch IS NOT NULL THEN
        -- An open batch is returned again until finish_batch: a consumer that
        -- crashed mid-batch gets the very same batch.
        SELECT * INTO nxt FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id = sub.sub_next_tick;
        batch_id := sub.sub_batch;
    ELSE
        IF i_min_count IS NOT NULL OR i_min_interval IS NOT NULL THEN
            SELECT h.next_tick_id INTO nxt.tick_id
              FROM pgq.find_tick_helper(q.queue_id, prev.tick_id, prev.tick_time, prev.tick_event_seq,
                                        i_min_count, i_min_interval) h;
            IF nxt.tick_id IS NOT NULL THEN
                SELECT * INTO nxt FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id = nxt.tick_id;
            END IF;
        ELSIF i_max_events IS NOT NULL THEN
            SELECT * INTO nxt FROM pgq.tick t
             WHERE t.tick_queue = q.queue_id AND t.tick_id > prev.tick_id
               AND (t.tick_event_seq - prev.tick_event_seq <= i_max_events
                    OR t.tick_id = (SELECT min(t2.tick_id) FROM pgq.tick t2
                                     WHERE t2.tick_queue = q.queue_id AND t2.tick_id > prev.tick_id))
             ORDER BY t.tick_id DESC LIMIT 1;
        ELSE
            SELECT * INTO nxt FROM pgq.tick
             WHERE tick_queue = q.queue_id AND tick_id > prev.tick_id ORDER BY tick_id LIMIT 1;
        END IF;
        IF nxt.tick_id IS NULL OR (i_min_lag IS NOT NULL AND nxt.tick_time > now() - i_min_lag) THEN
            -- No batch: every column NULL, as in PgQ.
            UPDATE pgq.subscription SET sub_active = now() WHERE sub_id = sub.sub_id;
            RETURN;
        END IF;
        batch_id := nextval('pgq.batch_id_seq');
        UPDATE pgq.subscription SET sub_batch = batch_id, sub_next_tick = nxt.tick_id, sub_active = now()
         WHERE sub_id = sub.sub_id;
    END IF;
    cur_tick_id := nxt.tick_id;
    cur_tick_time := nxt.tick_time;
    cur_tick_event_seq := nxt.tick_event_seq;
    prev_tick_id := prev.tick_id;
    prev_tick_time := prev.tick_time;
    prev_tick_event_seq := prev.tick_event_seq;
END $$;

CREATE OR REPLACE FUNCTION pgq.next_batch_info(i_queue_name text, i_consumer_name text,
    OUT batch_id bigint, OUT cur_tick_id bigint, OUT prev_tick_id bigint,
    OUT cur_tick_time timestamptz, OUT prev_tick_time timestamptz,
    OUT cur_tick_event_seq bigint, OUT prev_tick_event_seq bigint)
LANGUAGE sql AS $$
    SELECT * FROM pgq._next_batch(i_queue_name, i_consumer_name, NULL, NULL, NULL, NULL)
$$;

CREATE OR REPLACE FUNCTION pgq.next_batch(i_queue_name text, i_consumer_name text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT batch_id FROM pgq._next_batch(i_queue_name, i_consumer_name, NULL, NULL, NULL, NULL)
$$;

CREATE OR REPLACE FUNCTION pgq.next_batch_custom(i_queue_name text, i_consumer_name text,
    i_min_lag interval, i_min_count int4, i_min_interval interval,
    OUT batch_id bigint, OUT cur_tick_id bigint, OUT prev_tick_id bigint,
    OUT cur_tick_time timestamptz, OUT prev_tick_time timestamptz,
    OUT cur_tick_event_seq bigint, OUT prev_tick_event_seq bigint)
LANGUAGE sql AS $$
    SELECT * FROM pgq._next_batch(i_queue_name, i_consumer_name, i_min_lag, i_min_count, i_min_interval, NULL)
$$;

-- londiste-rs addition: a batch that spans as many ticks as fit in i_max_events, so a
-- lagging consumer catches up in large batches instead of one per (frequent) tick.
CREATE OR REPLACE FUNCTION pgq.next_batch_max(i_queue_name text, i_consumer_name text, i_max_events bigint,
    OUT batch_id bigint, OUT cur_tick_id bigint, OUT prev_tick_id bigint,
    OUT cur_tick_time timestamptz, OUT prev_tick_time timestamptz,
    OUT cur_tick_event_seq bigint, OUT prev_tick_event_seq bigint)
LANGUAGE sql AS $$
    SELECT * FROM pgq._next_batch(i_queue_name, i_consumer_name, NULL, NULL, NULL, i_max_events)
$$;

-- The SQL that reads a batch's events: those whose transaction is visible in the
-- batch's last tick snapshot and was not in the first. Range-scan ev_txid from the
-- first tick's xmax, plus the transactions that were still running at the first tick.
CREATE OR REPLACE FUNCTION pgq.batch_event_sql(x_batch_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    sub pgq.subscription;
    q pgq.queue;
    prev pgq.tick;
    cur pgq.tick;
    xip text;
    cols text := 'ev_id, ev_time, ev_txid, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4';
    owner_filter text;
    sql text;
BEGIN
    SELECT * INTO sub FROM pgq.subscription WHERE sub_batch = x_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch not found: %', x_batch_id;
    END IF;
    SELECT * INTO q FROM pgq.queue WHERE queue_id = sub.sub_queue;
    SELECT * INTO prev FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id = sub.sub_last_tick;
    SELECT * INTO cur FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id = sub.sub_next_tick;
    owner_filter := format('(ev_owner IS NULL OR ev_owner = %s)', sub.sub_id);
    sql := format('SELECT %s FROM %s WHERE ev_txid >= %s AND ev_txid < %s AND txid_visible_in_snapshot(ev_txid, %L::txid_snapshot) AND %s',
                  cols, q.queue_data_pfx, txid_snapshot_xmax(prev.tick_snapshot), txid_snapshot_xmax(cur.tick_snapshot),
                  cur.tick_snapshot, owner_filter);
    SELECT string_agg(x::text, ',') INTO xip FROM txid_snapshot_xip(prev.tick_snapshot) x
     WHERE txid_visible_in_snapshot(x, cur.tick_snapshot);
    IF xip IS NOT NULL THEN
        sql := sql || format(' UNION ALL SELECT %s FROM %s WHERE ev_txid IN (%s) AND %s', cols, q.queue_data_pfx, xip, owner_filter);
    END IF;
    RETURN sql || ' ORDER BY 1';
END $$;

-- The event tables that can hold a batch's events (PgQ's API; batch_event_sql
-- reads the queue's parent table instead, which covers them all). Rotation step
-- 1 makes the next table current at txid switch_step1; step 2 records the
-- txid (switch_step2) after which no transaction writes to the old one. A
-- batch wholly before the switch is in the previous table, one wholly after
-- step 2 in the current one, any other in both.
CREATE OR REPLACE FUNCTION pgq.batch_event_tables(x_batch_id bigint) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    lo bigint;
    hi bigint;
    prev_nr int4;
BEGIN
    SELECT txid_snapshot_xmin(a.tick_snapshot), txid_snapshot_xmax(b.tick_snapshot)
      INTO lo, hi
      FROM pgq.subscription s
      JOIN pgq.queue qq ON qq.queue_id = s.sub_queue
      JOIN pgq.tick a ON a.tick_queue = s.sub_queue AND a.tick_id = s.sub_last_tick
      JOIN pgq.tick b ON b.tick_queue = s.sub_queue AND b.tick_id = s.sub_next_tick
     WHERE s.sub_batch = x_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Cannot find data for batch %', x_batch_id;
    END IF;
    SELECT qq.* INTO q FROM pgq.queue qq JOIN pgq.subscription s ON s.sub_queue = qq.queue_id
     WHERE s.sub_batch = x_batch_id;
    prev_nr := (q.queue_cur_table + q.queue_ntables - 1) % q.queue_ntables;
    IF NOT (q.queue_switch_step2 IS NOT NULL AND lo > q.queue_switch_step2) THEN
        RETURN NEXT q.queue_data_pfx || '_' || prev_nr;
    END IF;
    IF NOT (hi < q.queue_switch_step1) THEN
        RETURN NEXT q.queue_data_pfx || '_' || q.queue_cur_table;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgq.get_batch_events(x_batch_id bigint,
    OUT ev_id bigint, OUT ev_time timestamptz, OUT ev_txid bigint, OUT ev_retry int4,
    OUT ev_type text, OUT ev_data text, OUT ev_extra1 text, OUT ev_extra2 text,
    OUT ev_extra3 text, OUT ev_extra4 text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE pgq.batch_event_sql(x_batch_id);
END $$;

CREATE OR REPLACE FUNCTION pgq.get_batch_cursor(i_batch_id bigint, i_cursor_name text, i_quick_limit int4, i_extra_where text,
    OUT ev_id bigint, OUT ev_time timestamptz, OUT ev_txid bigint, OUT ev_retry int4,
    OUT ev_type text, OUT ev_data text, OUT ev_extra1 text, OUT ev_extra2 text,
    OUT ev_extra3 text, OUT ev_extra4 text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE sql text;
BEGIN
    sql := pgq.batch_event_sql(i_batch_id);
    IF i_extra_where IS NOT NULL AND i_extra_where <> '' THEN
        sql := format('SELECT * FROM (%s) ev WHERE %s ORDER BY 1', sql, i_extra_where);
    END IF;
    EXECUTE format('DECLARE %I NO SCROLL CURSOR FOR %s', i_cursor_name, sql);
    RETURN QUERY EXECUTE format('FETCH %s FROM %I', i_quick_limit, i_cursor_name);
END $$;

CREATE OR REPLACE FUNCTION pgq.get_batch_cursor(i_batch_id bigint, i_cursor_name text, i_quick_limit int4,
    OUT ev_id bigint, OUT ev_time timestamptz, OUT ev_txid bigint, OUT ev_retry int4,
    OUT ev_type text, OUT ev_data text, OUT ev_extra1 text, OUT ev_extra2 text,
    OUT ev_extra3 text, OUT ev_extra4 text)
RETURNS SETOF record LANGUAGE sql AS $$
    SELECT * FROM pgq.get_batch_cursor(i_batch_id, i_cursor_name, i_quick_limit, NULL)
$$;

CREATE OR REPLACE FUNCTION pgq.finish_batch(x_batch_id bigint) RETURNS int4
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgq.subscription SET sub_active = now(), sub_last_tick = sub_next_tick,
           sub_next_tick = NULL, sub_batch = NULL
     WHERE sub_batch = x_batch_id;
    IF NOT FOUND THEN
        RAISE WARNING 'finish_batch: batch % not found', x_batch_id;
        RETURN 0;
    END IF;
    RETURN 1;
END $$;

-- ---------------------------------------------------------------------------------
-- Retry
-- ---------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgq.event_retry(x_batch_id bigint, x_event_id bigint, x_retry_time timestamptz) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    sub pgq.subscription;
    n int4;
BEGIN
    SELECT * INTO sub FROM pgq.subscription WHERE sub_batch = x_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch not found: %', x_batch_id;
    END IF;
    EXECUTE format('INSERT INTO pgq.retry_queue (ev_retry_after, ev_queue, ev_id, ev_time, ev_txid, ev_owner, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
                    SELECT $1, $2, ev_id, ev_time, ev_txid, $3, coalesce(ev_retry, 0) + 1, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4
                      FROM (%s) ev WHERE ev_id = $4
                    ON CONFLICT DO NOTHING', pgq.batch_event_sql(x_batch_id))
        USING x_retry_time, sub.sub_queue, sub.sub_id, x_event_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION pgq.event_retry(x_batch_id bigint, x_event_id bigint, x_retry_seconds int4) RETURNS int4
LANGUAGE sql AS $$
    SELECT pgq.event_retry(x_batch_id, x_event_id, now() + x_retry_seconds * interval '1 second')
$$;

CREATE OR REPLACE FUNCTION pgq.batch_retry(i_batch_id bigint, i_retry_seconds int4) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    sub pgq.subscription;
    n int4;
BEGIN
    SELECT * INTO sub FROM pgq.subscription WHERE sub_batch = i_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch not found: %', i_batch_id;
    END IF;
    EXECUTE format('INSERT INTO pgq.retry_queue (ev_retry_after, ev_queue, ev_id, ev_time, ev_txid, ev_owner, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
                    SELECT now() + $1 * interval ''1 second'', $2, ev_id, ev_time, ev_txid, $3, coalesce(ev_retry, 0) + 1, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4
                      FROM (%s) ev
                    ON CONFLICT DO NOTHING', pgq.batch_event_sql(i_batch_id))
        USING i_retry_seconds, sub.sub_queue, sub.sub_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Puts an event straight into a consumer's retry queue (PgQ's API, used by
-- cascaded consumers to keep an event for later); a NULL id takes a new one.
CREATE OR REPLACE FUNCTION pgq.event_retry_raw(x_queue text, x_consumer text, x_retry_after timestamptz,
    x_ev_id bigint, x_ev_time timestamptz, x_ev_retry int4, x_ev_type text, x_ev_data text,
    x_ev_extra1 text, x_ev_extra2 text, x_ev_extra3 text, x_ev_extra4 text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q pgq.queue;
    sub_id int4;
    id bigint;
BEGIN
    SELECT s.sub_id INTO sub_id
      FROM pgq.queue qq
      JOIN pgq.subscription s ON s.sub_queue = qq.queue_id
      JOIN pgq.consumer c ON c.co_id = s.sub_consumer
     WHERE qq.queue_name = x_queue AND c.co_name = x_consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer not registered';
    END IF;
    q := pgq._queue(x_queue);
    id := coalesce(x_ev_id, nextval(q.queue_event_seq));
    INSERT INTO pgq.retry_queue (ev_retry_after, ev_queue, ev_id, ev_time, ev_txid, ev_owner, ev_retry,
                                 ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
    VALUES (x_retry_after, q.queue_id, id, x_ev_time, txid_current(), sub_id, x_ev_retry,
            x_ev_type, x_ev_data, x_ev_extra1, x_ev_extra2, x_ev_extra3, x_ev_extra4);
    RETURN id;
END $$;

-- Puts due retry events back into their queue, visible to their owner only.
CREATE OR REPLACE FUNCTION pgq.maint_retry_events() RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    ev record;
    n int4 := 0;
BEGIN
    FOR ev IN SELECT r.*, q.queue_name FROM pgq.retry_queue r JOIN pgq.queue q ON q.queue_id = r.ev_queue
               WHERE r.ev_retry_after <= now() ORDER BY r.ev_retry_after LIMIT 1000
               FOR UPDATE OF r SKIP LOCKED LOOP
        PERFORM pgq.insert_event_raw(ev.queue_name, ev.ev_id, ev.ev_time, ev.ev_owner, ev.ev_retry,
                                     ev.ev_type, ev.ev_data, ev.ev_extra1, ev.ev_extra2, ev.ev_extra3, ev.ev_extra4);
        DELETE FROM pgq.retry_queue WHERE ev_owner = ev.ev_owner AND ev_id = ev.ev_id;
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- ---------------------------------------------------------------------------------
-- Maintenance: rotation
-- ---------------------------------------------------------------------------------

-- Step 1 truncates the oldest event table once no consumer can still need it, and
-- makes it the current one. Never DELETE: event tables do not bloat.
CREATE OR REPLACE FUNCTION pgq.maint_rotate_tables_step1(i_queue_name text) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    lowest_xmin bigint;
    nr int4;
    min_tick bigint;
BEGIN
    SELECT * INTO q FROM pgq.queue WHERE queue_name = i_queue_name FOR UPDATE;
    IF NOT FOUND OR q.queue_switch_step2 IS NULL
       OR q.queue_switch_time + q.queue_rotation_period > now() THEN
        RETURN 0;
    END IF;
    -- Consumers whose position predates the last rotation may still read the table
    -- that would be emptied.
    SELECT min(txid_snapshot_xmin(t.tick_snapshot)) INTO lowest_xmin
      FROM pgq.subscription s JOIN pgq.tick t ON t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
     WHERE s.sub_queue = q.queue_id;
    IF lowest_xmin IS NOT NULL AND lowest_xmin <= q.queue_switch_step2 THEN
        RETURN 0;
    END IF;
    nr := (q.queue_cur_table + 1) % q.queue_ntables;
    BEGIN
        EXECUTE format('LOCK TABLE %s_%s IN ACCESS EXCLUSIVE MODE NOWAIT', q.queue_data_pfx, nr);
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    EXECUTE format('TRUNCATE %s_%s', q.queue_data_pfx, nr);
    UPDATE pgq.queue SET queue_cur_table = nr, queue_switch_time = now(),
           queue_switch_step1 = txid_current(), queue_switch_step2 = NULL
     WHERE queue_id = q.queue_id;
    -- Ticks older than every consumer's position are no longer needed; keep the last.
    SELECT min(sub_last_tick) INTO min_tick FROM pgq.subscription WHERE sub_queue = q.queue_id;
    IF min_tick IS NULL THEN
        SELECT max(tick_id) INTO min_tick FROM pgq.tick WHERE tick_queue = q.queue_id;
    END IF;
    DELETE FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id < min_tick
       AND txid_snapshot_xmin(tick_snapshot) < q.queue_switch_step2;
    RETURN 0;
END $$;

-- Step 2 runs in its own transaction after step 1 committed: from then on every new
-- transaction writes to the new table.
CREATE OR REPLACE FUNCTION pgq.maint_rotate_tables_step2() RETURNS int4
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgq.queue SET queue_switch_step2 = txid_current() WHERE queue_switch_step2 IS NULL;
    RETURN 0;
END $$;

CREATE OR REPLACE FUNCTION pgq.maint_tables_to_vacuum() RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT 'pgq.subscription'::text WHERE current_setting('autovacuum') <> 'on'
    UNION ALL SELECT 'pgq.consumer' WHERE current_setting('autovacuum') <> 'on'
    UNION ALL SELECT 'pgq.queue' WHERE current_setting('autovacuum') <> 'on'
    UNION ALL SELECT 'pgq.tick' WHERE current_setting('autovacuum') <> 'on'
    UNION ALL SELECT 'pgq.retry_queue' WHERE current_setting('autovacuum') <> 'on'
$$;

-- The order is PgQ's: rotation step 1 per due queue (by name), step 2 after it
-- (in its own transaction: the daemon commits each call) or while a rotation is
-- half done, the queues' extra maintenance, vacuum, then londiste's.
CREATE OR REPLACE FUNCTION pgq.maint_operations(OUT func_name text, OUT func_arg text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE
    q record;
    f text;
    nrot int4 := 0;
    has_root boolean;
BEGIN
    FOR q IN SELECT queue_name FROM pgq.queue
              WHERE queue_switch_step2 IS NOT NULL AND queue_switch_time + queue_rotation_period < now()
              ORDER BY queue_name LOOP
        func_name := 'pgq.maint_rotate_tables_step1';
        func_arg := q.queue_name;
        nrot := nrot + 1;
        RETURN NEXT;
    END LOOP;
    IF nrot > 0 OR EXISTS (SELECT 1 FROM pgq.queue WHERE queue_switch_step2 IS NULL) THEN
        func_name := 'pgq.maint_rotate_tables_step2';
        func_arg := NULL;
        RETURN NEXT;
    END IF;
    FOR q IN SELECT queue_name, queue_extra_maint FROM pgq.queue
              WHERE queue_extra_maint IS NOT NULL ORDER BY queue_name LOOP
        FOREACH f IN ARRAY q.queue_extra_maint LOOP
            func_name := f;
            func_arg := q.queue_name;
            RETURN NEXT;
        END LOOP;
    END LOOP;
    FOR f IN SELECT maint_table FROM (SELECT pgq.maint_tables_to_vacuum() AS maint_table) v LOOP
        func_name := 'vacuum';
        func_arg := f;
        RETURN NEXT;
    END LOOP;
    -- londiste's maintenance (sequence tracking) only has work on a root node.
    IF to_regprocedure('londiste.periodic_maintenance()') IS NOT NULL
       AND to_regclass('londiste.node_info') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM londiste.node_info WHERE node_type = ''root'')' INTO has_root;
        IF has_root THEN
            func_name := 'londiste.periodic_maintenance';
            func_arg := NULL;
            RETURN NEXT;
        END IF;
    END IF;
END $$;

-- ---------------------------------------------------------------------------------
-- Information
-- ---------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgq.get_queue_info(
    OUT queue_name text, OUT queue_ntables int4, OUT queue_cur_table int4,
    OUT queue_rotation_period interval, OUT queue_switch_time timestamptz,
    OUT queue_external_ticker boolean, OUT queue_ticker_paused boolean,
    OUT queue_ticker_max_count int4, OUT queue_ticker_max_lag interval,
    OUT queue_ticker_idle_period interval, OUT ticker_lag interval,
    OUT ev_per_sec float8, OUT ev_new bigint, OUT last_tick_id bigint)
RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE
    q pgq.queue;
    t1 pgq.tick;
    t2 pgq.tick;
    seq bigint;
BEGIN
    FOR q IN SELECT * FROM pgq.queue ORDER BY queue_name LOOP
        SELECT * INTO t1 FROM pgq.tick WHERE tick_queue = q.queue_id ORDER BY tick_id DESC LIMIT 1;
        SELECT * INTO t2 FROM pgq.tick WHERE tick_queue = q.queue_id AND tick_id < t1.tick_id ORDER BY tick_id DESC LIMIT 1;
        seq := pgq._seq_last(q.queue_event_seq);
        queue_name := q.queue_name;
        queue_ntables := q.queue_ntables;
        queue_cur_table := q.queue_cur_table;
        queue_rotation_period := q.queue_rotation_period;
        queue_switch_time := q.queue_switch_time;
        queue_external_ticker := q.queue_external_ticker;
        queue_ticker_paused := q.queue_ticker_paused;
        queue_ticker_max_count := q.queue_ticker_max_count;
        queue_ticker_max_lag := q.queue_ticker_max_lag;
        queue_ticker_idle_period := q.queue_ticker_idle_period;
        ticker_lag := now() - t1.tick_time;
        IF t2.tick_id IS NOT NULL AND t1.tick_time > t2.tick_time THEN
            ev_per_sec := (t1.tick_event_seq - t2.tick_event_seq) / extract(epoch FROM t1.tick_time - t2.tick_time);
        ELSE
            ev_per_sec := NULL;
        END IF;
        ev_new := seq - coalesce(t1.tick_event_seq, 0);
        last_tick_id := t1.tick_id;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgq.get_queue_info(i_queue_name text,
    OUT queue_name text, OUT queue_ntables int4, OUT queue_cur_table int4,
    OUT queue_rotation_period interval, OUT queue_switch_time timestamptz,
    OUT queue_external_ticker boolean, OUT queue_ticker_paused boolean,
    OUT queue_ticker_max_count int4, OUT queue_ticker_max_lag interval,
    OUT queue_ticker_idle_period interval, OUT ticker_lag interval,
    OUT ev_per_sec float8, OUT ev_new bigint, OUT last_tick_id bigint)
RETURNS SETOF record LANGUAGE sql AS $$
    SELECT * FROM pgq.get_queue_info() i WHERE i.queue_name = i_queue_name
$$;

CREATE OR REPLACE FUNCTION pgq.get_consumer_info(
    OUT queue_name text, OUT consumer_name text, OUT lag interval, OUT last_seen interval,
    OUT last_tick bigint, OUT current_batch bigint, OUT next_tick bigint, OUT pending_events bigint)
RETURNS SETOF record LANGUAGE sql AS $$
    SELECT q.queue_name, c.co_name, now() - t.tick_time, now() - s.sub_active,
           s.sub_last_tick, s.sub_batch, s.sub_next_tick,
           greatest(pgq._seq_last(q.queue_event_seq) - t.tick_event_seq, 0)
      FROM pgq.subscription s
      JOIN pgq.queue q ON q.queue_id = s.sub_queue
      JOIN pgq.consumer c ON c.co_id = s.sub_consumer
      LEFT JOIN pgq.tick t ON t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
     ORDER BY 1, 2
$$;

CREATE OR REPLACE FUNCTION pgq.get_consumer_info(i_queue_name text,
    OUT queue_name text, OUT consumer_name text, OUT lag interval, OUT last_seen interval,
    OUT last_tick bigint, OUT current_batch bigint, OUT next_tick bigint, OUT pending_events bigint)
RETURNS SETOF record LANGUAGE sql AS $$
    SELECT * FROM pgq.get_consumer_info() i WHERE i.queue_name = i_queue_name
$$;

CREATE OR REPLACE FUNCTION pgq.get_consumer_info(i_queue_name text, i_consumer_name text,
    OUT queue_name text, OUT consumer_name text, OUT lag interval, OUT last_seen interval,
    OUT last_tick bigint, OUT current_batch bigint, OUT next_tick bigint, OUT pending_events bigint)
RETURNS SETOF record LANGUAGE sql AS $$
    SELECT * FROM pgq.get_consumer_info() i WHERE i.queue_name = i_queue_name AND i.consumer_name = i_consumer_name
$$;

CREATE OR REPLACE FUNCTION pgq.get_batch_info(x_batch_id bigint,
    OUT queue_name text, OUT consumer_name text, OUT batch_start timestamptz, OUT batch_end timestamptz,
    OUT prev_tick_id bigint, OUT tick_id bigint, OUT lag interval, OUT seq_start bigint, OUT seq_end bigint)
LANGUAGE sql AS $$
    SELECT q.queue_name, c.co_name, prev.tick_time, cur.tick_time, s.sub_last_tick, s.sub_next_tick,
           now() - cur.tick_time, prev.tick_event_seq, cur.tick_event_seq
      FROM pgq.subscription s
      JOIN pgq.queue q ON q.queue_id = s.sub_queue
      JOIN pgq.consumer c ON c.co_id = s.sub_consumer
      JOIN pgq.tick prev ON prev.tick_queue = s.sub_queue AND prev.tick_id = s.sub_last_tick
      JOIN pgq.tick cur ON cur.tick_queue = s.sub_queue AND cur.tick_id = s.sub_next_tick
     WHERE s.sub_batch = x_batch_id
$$;

-- Queues created by older versions get the storage settings too.
SELECT pgq._tune_event_storage(c.oid)
  FROM pgq.queue q
  JOIN pg_class c ON c.relname ~ ('^' || split_part(q.queue_data_pfx, '.', 2) || '_[0-9]+$')
  JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'pgq';
