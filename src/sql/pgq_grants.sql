-- londiste-rs: PgQ's permission model (part of the pgq component; runs last).
--
-- Three roles, as PgQ has them:
--   pgq_reader  consumes: registers, reads batches, retries and finishes them
--   pgq_writer  produces: insert_event and the producer triggers
--   pgq_admin   creates and drops queues, ticks, maintains; member of both
-- A producer cannot consume and a consumer cannot produce: PUBLIC may execute
-- only the information functions (queue and consumer info, version), and read
-- the queue, consumer, subscription and tick tables, never the events. The
-- functions of the three lists run with the rights of the schema's owner
-- (SECURITY DEFINER, fixed search_path), so the roles need no rights on the
-- tables behind them; the producer triggers run as the writing user, who needs
-- pgq_writer (or EXECUTE on pgq.insert_event).
-- The roles are cluster-wide: the install creates those missing when the
-- installing role may (superuser or CREATEROLE); otherwise pgq.missing_grants()
-- says what to create, and pgq.grant_roles() (run by the schema's owner once
-- they exist) makes the grants.

CREATE OR REPLACE FUNCTION pgq._role_functions(OUT role text, OUT fn regprocedure)
RETURNS SETOF record LANGUAGE sql STABLE AS $$
    SELECT r, f::regprocedure FROM (VALUES
        ('public', 'pgq.seq_getval(text)'), ('public', 'pgq._seq_last(text)'),
        ('public', 'pgq.get_queue_info()'), ('public', 'pgq.get_queue_info(text)'),
        ('public', 'pgq.get_consumer_info()'), ('public', 'pgq.get_consumer_info(text)'),
        ('public', 'pgq.get_consumer_info(text,text)'), ('public', 'pgq.quote_fqname(text)'),
        ('public', 'pgq.version()'), ('public', 'pgq._server_version()'), ('public', 'pgq._trigger_exec()'),
        ('pgq_reader', 'pgq.batch_event_sql(bigint)'), ('pgq_reader', 'pgq.batch_event_tables(bigint)'),
        ('pgq_reader', 'pgq.find_tick_helper(int4,int8,timestamptz,int8,int8,interval)'),
        ('pgq_reader', 'pgq.register_consumer(text,text)'), ('pgq_reader', 'pgq.register_consumer_at(text,text,bigint)'),
        ('pgq_reader', 'pgq.unregister_consumer(text,text)'), ('pgq_reader', 'pgq.next_batch_info(text,text)'),
        ('pgq_reader', 'pgq.next_batch(text,text)'), ('pgq_reader', 'pgq.next_batch_custom(text,text,interval,int4,interval)'),
        ('pgq_reader', 'pgq.next_batch_max(text,text,bigint)'), ('pgq_reader', 'pgq.get_batch_events(bigint)'),
        ('pgq_reader', 'pgq.get_batch_info(bigint)'), ('pgq_reader', 'pgq.get_batch_cursor(bigint,text,int4,text)'),
        ('pgq_reader', 'pgq.get_batch_cursor(bigint,text,int4)'), ('pgq_reader', 'pgq.event_retry(bigint,bigint,timestamptz)'),
        ('pgq_reader', 'pgq.event_retry(bigint,bigint,integer)'), ('pgq_reader', 'pgq.batch_retry(bigint,integer)'),
        ('pgq_reader', 'pgq.force_tick(text)'), ('pgq_reader', 'pgq.finish_batch(bigint)'),
        ('pgq_writer', 'pgq.insert_event(text,text,text)'), ('pgq_writer', 'pgq.insert_event(text,text,text,text,text,text,text)'),
        ('pgq_writer', 'pgq.current_event_table(text)'), ('pgq_writer', 'pgq.jsontriga()'),
        ('pgq_writer', 'pgq.sqltriga()'), ('pgq_writer', 'pgq.logutriga()'),
        -- What the triggers call as the writing user before insert_event
        -- (read-only): a user who may not produce is refused at
        -- insert_event, as with PgQ's own triggers.
        ('public', 'pgq._producer_prepare(text,oid,text,text,text,text,text,text[])'),
        ('public', 'pgq._urlencode(text)'),
        ('pgq_admin', 'pgq.ticker(text,bigint,timestamptz,bigint)'), ('pgq_admin', 'pgq.ticker(text)'),
        ('pgq_admin', 'pgq.ticker()'), ('pgq_admin', 'pgq.maint_retry_events()'),
        ('pgq_admin', 'pgq.maint_rotate_tables_step1(text)'), ('pgq_admin', 'pgq.maint_rotate_tables_step2()'),
        ('pgq_admin', 'pgq.maint_tables_to_vacuum()'), ('pgq_admin', 'pgq.maint_operations()'),
        ('pgq_admin', 'pgq.seq_setval(text,int8)'), ('pgq_admin', 'pgq.create_queue(text)'),
        ('pgq_admin', 'pgq.drop_queue(text,bool)'), ('pgq_admin', 'pgq.drop_queue(text)'),
        ('pgq_admin', 'pgq.set_queue_config(text,text,text)'),
        ('pgq_admin', 'pgq.insert_event_raw(text,bigint,timestamptz,integer,integer,text,text,text,text,text,text)'),
        ('pgq_admin', 'pgq.event_retry_raw(text,text,timestamptz,bigint,timestamptz,integer,text,text,text,text,text,text)')
    ) v(r, f)
$$;

-- Table rights per role; event tables get event_template's.
CREATE OR REPLACE FUNCTION pgq._role_tables(OUT role text, OUT tbl text, OUT privs text)
RETURNS SETOF record LANGUAGE sql STABLE AS $$
    SELECT r, t, p FROM (VALUES
        ('public', 'pgq.consumer', 'SELECT'), ('public', 'pgq.queue', 'SELECT'),
        ('public', 'pgq.tick', 'SELECT'), ('public', 'pgq.subscription', 'SELECT'),
        ('public', 'pgq.schema_info', 'SELECT'),
        ('pgq_reader', 'pgq.consumer', 'SELECT'), ('pgq_reader', 'pgq.queue', 'SELECT'),
        ('pgq_reader', 'pgq.tick', 'SELECT'), ('pgq_reader', 'pgq.subscription', 'SELECT'),
        ('pgq_reader', 'pgq.event_template', 'SELECT'),
        ('pgq_admin', 'pgq.consumer', 'SELECT, INSERT, UPDATE, DELETE'),
        ('pgq_admin', 'pgq.queue', 'SELECT, INSERT, UPDATE, DELETE'),
        ('pgq_admin', 'pgq.tick', 'SELECT, INSERT, UPDATE, DELETE'),
        ('pgq_admin', 'pgq.subscription', 'SELECT, INSERT, UPDATE, DELETE'),
        ('pgq_admin', 'pgq.event_template', 'SELECT, INSERT, TRUNCATE'),
        ('pgq_admin', 'pgq.retry_queue', 'SELECT, INSERT, UPDATE, DELETE')
    ) v(r, t, p)
$$;

-- The grants of one queue's tables and sequences.
CREATE OR REPLACE FUNCTION pgq._grant_queue(q pgq.queue) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    i int4;
BEGIN
    EXECUTE format('GRANT SELECT ON %s, %s TO PUBLIC', q.queue_tick_seq, q.queue_event_seq);
    FOR t IN SELECT role, privs FROM pgq._role_tables()
              WHERE tbl = 'pgq.event_template' AND (role = 'public' OR pgq._role_exists(role)) LOOP
        FOR i IN -1 .. q.queue_ntables - 1 LOOP
            EXECUTE format('GRANT %s ON %s TO %I', t.privs,
                           q.queue_data_pfx || CASE WHEN i < 0 THEN '' ELSE '_' || i END, t.role);
        END LOOP;
    END LOOP;
    IF pgq._role_exists('pgq_admin') THEN
        EXECUTE format('GRANT USAGE ON %s TO pgq_admin', q.queue_event_seq);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgq._role_exists(i_role text) RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = i_role) $$;

-- Revokes PUBLIC's default rights and grants the roles that exist theirs;
-- returns how many of the three roles were granted. Run by the owner of the
-- schema (the install runs it; run it again after creating missing roles).
CREATE OR REPLACE FUNCTION pgq.grant_roles() RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    q pgq.queue;
    n int4 := 0;
BEGIN
    GRANT USAGE ON SCHEMA pgq TO PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgq FROM PUBLIC;
    FOR r IN SELECT * FROM pgq._role_functions() WHERE role = 'public' OR pgq._role_exists(role) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.fn, r.role);
    END LOOP;
    FOR r IN SELECT * FROM pgq._role_tables() WHERE role = 'public' OR pgq._role_exists(role) LOOP
        EXECUTE format('GRANT %s ON %s TO %I', r.privs, r.tbl, r.role);
    END LOOP;
    FOR q IN SELECT * FROM pgq.queue LOOP
        PERFORM pgq._grant_queue(q);
    END LOOP;
    SELECT count(*) INTO n FROM pg_roles WHERE rolname IN ('pgq_reader', 'pgq_writer', 'pgq_admin');
    RETURN n;
END $$;

-- What is missing for the permission model, one line each with the fix;
-- no rows when everything is in place. `londiste-rs check` reports these.
CREATE OR REPLACE FUNCTION pgq.missing_grants() RETURNS SETOF text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r text;
    n int4;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgq_reader', 'pgq_writer', 'pgq_admin'] LOOP
        IF NOT pgq._role_exists(r) THEN
            RETURN NEXT format('role %s does not exist: as a superuser or a role with CREATEROLE run CREATE ROLE %s%s; then, as the owner of schema pgq, SELECT pgq.grant_roles();',
                               r, r, CASE WHEN r = 'pgq_admin' THEN ' IN ROLE pgq_reader, pgq_writer' ELSE '' END);
            CONTINUE;
        END IF;
        SELECT count(*) INTO n FROM pgq._role_functions() f
         WHERE f.role = r AND NOT has_function_privilege(r, f.fn, 'EXECUTE');
        IF n > 0 THEN
            RETURN NEXT format('role %s lacks EXECUTE on %s pgq function(s): as the owner of schema pgq run SELECT pgq.grant_roles();', r, n);
        END IF;
    END LOOP;
    FOREACH r IN ARRAY ARRAY['pgq_reader', 'pgq_writer'] LOOP
        IF pgq._role_exists(r) AND pgq._role_exists('pgq_admin') AND NOT pg_has_role('pgq_admin', r, 'USAGE') THEN
            RETURN NEXT format('role pgq_admin is not a member of %s: GRANT %s TO pgq_admin;', r, r);
        END IF;
    END LOOP;
    SELECT count(*) INTO n FROM pg_proc p
     WHERE p.pronamespace = 'pgq'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')
       AND p.oid NOT IN (SELECT fn FROM pgq._role_functions() WHERE role = 'public')
       AND p.proname NOT LIKE '\_cap\_%';
    IF n > 0 THEN
        RETURN NEXT format('PUBLIC may execute %s pgq function(s) beyond the information functions, so every role can produce and consume: as the owner of schema pgq run SELECT pgq.grant_roles();', n);
    END IF;
END $$;

-- The functions of the three lists run as the schema's owner.
DO $do$
DECLARE
    f regprocedure;
BEGIN
    -- (Not those that only read what their callers may read anyway, nor
    -- seq_setval, whose argument is resolved with the caller's search_path,
    -- nor the batch readers: get_batch_cursor runs its caller's extra_where,
    -- which must not run with the owner's rights; readers have SELECT on the
    -- event tables instead.)
    FOR f IN SELECT fn FROM pgq._role_functions()
              WHERE role <> 'public' AND fn::text NOT LIKE '%triga()' AND fn::text NOT LIKE 'pgq.\_%'
                AND fn::text NOT IN ('pgq.seq_setval(text,bigint)',
                                     'pgq.batch_event_sql(bigint)', 'pgq.batch_event_tables(bigint)',
                                     'pgq.get_batch_info(bigint)', 'pgq.maint_tables_to_vacuum()',
                                     'pgq.current_event_table(text)', 'pgq.insert_event(text,text,text)',
                                     'pgq.insert_event_raw(text,bigint,timestamp with time zone,integer,integer,text,text,text,text,text,text)')
                AND fn::text NOT LIKE 'pgq.find_tick_helper(%'
                AND fn::text NOT LIKE 'pgq.get_batch_events(%' AND fn::text NOT LIKE 'pgq.get_batch_cursor(%' LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END $do$;

-- Create the roles where the installing role may (they are cluster-wide:
-- another database, or another installer running at the same time, may
-- have made them already).
DO $do$
DECLARE
    r text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        RETURN;
    END IF;
    FOREACH r IN ARRAY ARRAY['pgq_reader', 'pgq_writer', 'pgq_admin'] LOOP
        CONTINUE WHEN pgq._role_exists(r);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            IF r = 'pgq_admin' THEN
                GRANT pgq_reader, pgq_writer TO pgq_admin;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation OR insufficient_privilege THEN
            NULL;
        END;
    END LOOP;
END $do$;

SELECT pgq.grant_roles();
