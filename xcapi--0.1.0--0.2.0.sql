/* xcapi--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION xcapi UPDATE TO '0.2.0'" to load this file. \quit

/*
 * The queue index no longer depends on status, so claiming a row
 * (queued -> sending) changes no indexed column and can be a HOT update.
 * A finished row (sent or dead) has no next attempt: next_attempt_at IS
 * NULL, which keeps it out of the index's range scans.
 */
ALTER TABLE @extschema@.xcapi_conversions ALTER COLUMN next_attempt_at DROP NOT NULL;
UPDATE @extschema@.xcapi_conversions SET next_attempt_at = NULL
 WHERE status IN ('sent', 'dead');
ALTER TABLE @extschema@.xcapi_conversions
    ADD CONSTRAINT xcapi_conversions_next_attempt_check
    CHECK ((next_attempt_at IS NULL) = (status IN ('sent', 'dead')));
DROP INDEX @extschema@.xcapi_conversions_pending_idx;
CREATE INDEX xcapi_conversions_due_idx
    ON @extschema@.xcapi_conversions (next_attempt_at, id);

/*
 * Monitoring from the worker's shared memory.
 */
CREATE FUNCTION @extschema@.xcapi_worker_state(
    OUT pid integer,
    OUT started_at timestamptz,
    OUT requests bigint,
    OUT conversions_sent bigint,
    OUT retries bigint,
    OUT last_http_status integer,
    OUT paused_until timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'xcapi_worker_state'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION @extschema@.xcapi_worker_state() IS
    'the worker: pid, start, requests, conversions sent, failed requests, last HTTP status, latest end of a pixel pause';

CREATE FUNCTION @extschema@.xcapi_pixel_state(
    OUT pixel_id text,
    OUT account_id text,
    OUT paused_until timestamptz,
    OUT pause_reason text,
    OUT last_success_at timestamptz,
    OUT last_http_status integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'xcapi_pixel_state'
LANGUAGE C VOLATILE PARALLEL RESTRICTED ROWS 10;

COMMENT ON FUNCTION @extschema@.xcapi_pixel_state() IS
    'per pixel the worker has seen: its ad account, whether and why it is held back, last success and answer';

/* xcapi_stats gains the worker's view of each pixel (columns appended). */
CREATE OR REPLACE VIEW @extschema@.xcapi_stats AS
SELECT s.*,
       p.account_id,
       p.paused_until,
       p.pause_reason,
       p.last_http_status
  FROM (SELECT c.pixel_id,
               count(*) FILTER (WHERE c.status = 'queued')  AS queued,
               count(*) FILTER (WHERE c.status = 'sending') AS sending,
               count(*) FILTER (WHERE c.status = 'sent')    AS sent,
               count(*) FILTER (WHERE c.status = 'dead')    AS dead,
               count(*) FILTER (WHERE c.status = 'sent'
                                AND c.sent_at > now() - interval '1 hour') AS sent_last_hour,
               now() - min(c.created_at) FILTER (WHERE c.status = 'queued')
                                                            AS oldest_queued_age,
               max(c.sent_at)                               AS last_sent_at,
               (SELECT e.last_error
                  FROM @extschema@.xcapi_conversions e
                 WHERE e.pixel_id = c.pixel_id AND e.last_error IS NOT NULL
                 ORDER BY e.last_attempt_at DESC NULLS LAST, e.id DESC
                 LIMIT 1)                                   AS last_error
          FROM @extschema@.xcapi_conversions c
         GROUP BY c.pixel_id) s
  LEFT JOIN @extschema@.xcapi_pixel_state() p ON p.pixel_id = s.pixel_id;

REVOKE ALL ON FUNCTION @extschema@.xcapi_worker_state() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.xcapi_pixel_state() FROM PUBLIC;

-- monitoring roles may watch, without reading the queue itself
GRANT EXECUTE ON FUNCTION @extschema@.xcapi_worker_state() TO pg_monitor;
GRANT EXECUTE ON FUNCTION @extschema@.xcapi_pixel_state() TO pg_monitor;
GRANT SELECT ON @extschema@.xcapi_stats TO pg_monitor;

/*
 * CREATE TRIGGER ... EXECUTE FUNCTION xcapi_fire_trigger(...) checks its
 * arguments against the table at once, instead of at the first row.
 */
CREATE FUNCTION @extschema@.xcapi_check_new_triggers()
RETURNS event_trigger
AS 'MODULE_PATHNAME', 'xcapi_check_new_triggers'
LANGUAGE C;

COMMENT ON FUNCTION @extschema@.xcapi_check_new_triggers() IS
    'event trigger: validates the field=column arguments of new xcapi_fire_trigger triggers';

CREATE EVENT TRIGGER xcapi_check_new_triggers ON ddl_command_end
    WHEN TAG IN ('CREATE TRIGGER')
    EXECUTE FUNCTION @extschema@.xcapi_check_new_triggers();

/*
 * Every row is updated once more after its insert, and pauses move rows
 * around the due index: vacuum the outbox early rather than at 20 % dead.
 */
ALTER TABLE @extschema@.xcapi_conversions SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05);
