/* xcapi--0.2.0--0.3.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION xcapi UPDATE TO '0.3.0'" to load this file. \quit

/*
 * The intake: where xcapi_fire and xcapi_fire_trigger write new
 * conversions.  It inherits every column, default and CHECK constraint of
 * xcapi_conversions, so its rows are rows of xcapi_conversions to any
 * query on that table (SELECT, UPDATE, DELETE and TRUNCATE reach
 * inheritance children), from the moment they are inserted, in the
 * inserting transaction too.  It has no index: a new conversion costs the
 * inserting transaction one heap tuple, not a heap tuple and two index
 * entries.  The worker files its rows into xcapi_conversions itself (one
 * DELETE ... RETURNING feeding one INSERT, a transaction per chunk), where
 * the primary key and the due index serve claims, outcomes and lookups.
 * It is normally nearly empty; it is read by ctid, in chunks.
 */
CREATE TABLE @extschema@.xcapi_conversions_intake ()
    INHERITS (@extschema@.xcapi_conversions)
    WITH (fillfactor = 100);

COMMENT ON TABLE @extschema@.xcapi_conversions_intake IS
    'xcapi: new conversions, rows of xcapi_conversions until the worker files them into it';

REVOKE ALL ON @extschema@.xcapi_conversions_intake FROM PUBLIC;
