-- londiste-rs: schema changes at one queue position on every node (`execute`).
--
-- On the root, `execute FILE` runs, in one transaction: execute_start (records the
-- file, or says it was applied already), the file's statements, execute_finish
-- (queues the EXECUTE event). The event goes in after the statements on purpose:
-- by then the statements hold their locks, so every event of a writer that
-- touched those tables before has a lower ev_id, and every later one a higher
-- ev_id, and subscribers replay the file between the two, as the root saw it.
-- Subscribers record the file in the batch transaction that runs it, so a file
-- runs once per node whatever crashes in between.

CREATE TABLE IF NOT EXISTS londiste.applied_execute (
    queue_name text NOT NULL,
    execute_file text NOT NULL,
    execute_time timestamptz NOT NULL DEFAULT now(),
    -- As run on this node (table names after @name@ substitution).
    execute_sql text NOT NULL,
    execute_attrs text,
    PRIMARY KEY (queue_name, execute_file)
);

-- ret_code 200: go ahead (the file is recorded as applied by this transaction);
-- 201: already applied here, skip; 401: expect_root and this node is not the root.
-- A file that another queue already brought into this database with the same
-- local text (a merged table fed by several queues) counts as applied.
CREATE OR REPLACE FUNCTION londiste.execute_start(i_queue_name text, i_file_name text, i_sql text,
                                                  i_expect_root boolean, i_attrs text DEFAULT NULL,
                                                  OUT ret_code int4, OUT ret_note text)
LANGUAGE plpgsql AS $$
DECLARE
    n record;
    a record;
BEGIN
    SELECT node_type, node_name INTO n FROM londiste.node_info WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        ret_code := 404;
        ret_note := format('queue %s is not set up on this node', i_queue_name);
        RETURN;
    END IF;
    IF i_expect_root AND n.node_type <> 'root' THEN
        ret_code := 401;
        ret_note := format('Node is not root node: %s is a %s', n.node_name, n.node_type);
        RETURN;
    END IF;
    SELECT queue_name, execute_time INTO a FROM londiste.applied_execute
     WHERE execute_file = i_file_name
       AND (queue_name = i_queue_name OR execute_sql = i_sql)
     ORDER BY queue_name = i_queue_name DESC LIMIT 1;
    IF FOUND THEN
        ret_code := 201;
        ret_note := format('EXECUTE: %s already applied on node %s at %s%s, skipped',
                           i_file_name, n.node_name, to_char(a.execute_time, 'YYYY-MM-DD HH24:MI:SS'),
                           CASE WHEN a.queue_name <> i_queue_name THEN ' (from queue ' || a.queue_name || ')' ELSE '' END);
        RETURN;
    END IF;
    INSERT INTO londiste.applied_execute (queue_name, execute_file, execute_sql, execute_attrs)
    VALUES (i_queue_name, i_file_name, i_sql, i_attrs);
    ret_code := 200;
    ret_note := format('Executing: %s', i_file_name);
END $$;

-- On the root, queues the EXECUTE event of a file started with execute_start
-- (ev_data the file's text, ev_extra1 its name, ev_extra2 its attributes);
-- elsewhere nothing is left to do.
CREATE OR REPLACE FUNCTION londiste.execute_finish(i_queue_name text, i_file_name text,
                                                   OUT ret_code int4, OUT ret_note text)
LANGUAGE plpgsql AS $$
DECLARE
    a record;
BEGIN
    SELECT e.execute_sql, e.execute_attrs, ni.node_type INTO a
      FROM londiste.applied_execute e JOIN londiste.node_info ni ON ni.queue_name = e.queue_name
     WHERE e.queue_name = i_queue_name AND e.execute_file = i_file_name;
    IF NOT FOUND THEN
        ret_code := 404;
        ret_note := format('EXECUTE: %s was not started', i_file_name);
        RETURN;
    END IF;
    IF a.node_type = 'root' THEN
        PERFORM pgq.insert_event(i_queue_name, 'EXECUTE', a.execute_sql, i_file_name, a.execute_attrs, NULL, NULL);
    END IF;
    ret_code := 200;
    ret_note := format('Execute finished: %s', i_file_name);
END $$;

-- Registered tables of the root that the statements just run removed or
-- renamed: replication of those would break silently, so execute refuses.
CREATE OR REPLACE FUNCTION londiste.execute_lost_tables(i_queue_name text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT table_name FROM londiste.table_info
     WHERE queue_name = i_queue_name AND local AND to_regclass(table_name) IS NULL
     ORDER BY table_name
$$;
