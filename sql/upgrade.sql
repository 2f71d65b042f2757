-- upgrades: install the first released version, then step through every update
\set VERBOSITY terse
DROP EXTENSION xcapi;
SELECT source, target, path FROM pg_extension_update_paths('xcapi') WHERE path IS NOT NULL ORDER BY 1, 2;

CREATE EXTENSION xcapi VERSION '0.1.0';
SELECT extversion FROM pg_extension WHERE extname = 'xcapi';
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'before-upgrade@example.com', conversion_id => 'kept') > 0 AS fired_on_0_1_0;

ALTER EXTENSION xcapi UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'xcapi';

-- the queued row survived; the new objects are there
SELECT conversion_id, status IN ('queued', 'sending') AS pending FROM xcapi_conversions;
SELECT pg_describe_object(classid, objid, 0) AS object
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'xcapi')
   AND deptype = 'e'
 ORDER BY 1;
SELECT array_agg(attname ORDER BY attnum) AS xcapi_stats_columns
  FROM pg_attribute WHERE attrelid = 'xcapi_stats'::regclass AND attnum > 0;

-- a fresh install of the default version gives the same objects
DROP EXTENSION xcapi;
CREATE EXTENSION xcapi;
SELECT extversion FROM pg_extension WHERE extname = 'xcapi';
SELECT count(*) AS objects FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'xcapi')
   AND deptype = 'e';

-- the outbox's indexes and constraints as of the default version
SELECT indexrelid::regclass AS index, pg_get_indexdef(indexrelid) AS definition
  FROM pg_index WHERE indrelid = 'xcapi_conversions'::regclass ORDER BY 1;
SELECT conname, pg_get_constraintdef(oid) AS definition
  FROM pg_constraint WHERE conrelid = 'xcapi_conversions'::regclass ORDER BY 1;

-- new conversions go to the intake: a child of the outbox with its columns,
-- defaults and checks and no index; its rows are rows of xcapi_conversions at
-- once, in the inserting transaction too (the worker files them later)
SELECT inhrelid::regclass AS child, inhparent::regclass AS parent
  FROM pg_inherits WHERE inhparent = 'xcapi_conversions'::regclass;
SELECT count(*) AS intake_indexes
  FROM pg_index WHERE indrelid = 'xcapi_conversions_intake'::regclass;
SELECT conname, coninhcount
  FROM pg_constraint WHERE conrelid = 'xcapi_conversions_intake'::regclass ORDER BY 1;
SELECT reloptions FROM pg_class WHERE oid = 'xcapi_conversions_intake'::regclass;
BEGIN;
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'intake@example.com',
                  conversion_id => 'intake-1') AS intake_id \gset
SELECT tableoid::regclass AS stored_in, status, attempts, next_attempt_at = now() AS due_now
  FROM xcapi_conversions WHERE id = :intake_id;
SELECT count(*) AS in_the_outbox_only FROM ONLY xcapi_conversions WHERE id = :intake_id;
COMMIT;
-- nobody but its owner reads or writes it
SELECT has_table_privilege('public', 'xcapi_conversions_intake', 'SELECT') AS public_select,
       has_table_privilege('public', 'xcapi_conversions_intake', 'INSERT') AS public_insert;
