-- monitoring: the worker's shared state, per-pixel state, xcapi_stats
\set VERBOSITY terse

-- the worker of this instance has run and published its state
SELECT pid IS NOT NULL AS has_pid, started_at <= now() AS started, requests >= 0 AS counts
  FROM xcapi_worker_state();

-- it has no credentials: pixel o8z6j is held back, said so, and the view shows it
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        PERFORM 1 FROM xcapi_pixel_state() WHERE pixel_id = 'o8z6j';
        EXIT WHEN FOUND;
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT pixel_id, paused_until > now() AS paused, pause_reason, last_success_at
  FROM xcapi_pixel_state() WHERE pixel_id = 'o8z6j';
SELECT pixel_id, queued + sending > 0 AS has_pending, pause_reason, last_error IS NOT NULL AS has_error
  FROM xcapi_stats WHERE pixel_id = 'o8z6j';

-- pg_monitor may watch without reading the queue
CREATE ROLE xcapi_watcher LOGIN IN ROLE pg_monitor;
SET ROLE xcapi_watcher;
SELECT count(*) > 0 AS sees_stats FROM xcapi_stats;
SELECT count(*) = 1 AS sees_worker FROM xcapi_worker_state();
SELECT count(*) FROM xcapi_conversions;
RESET ROLE;
DROP ROLE xcapi_watcher;
