/* xcapi--0.1.0.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION xcapi" to load this file. \quit

/*
 * The outbox.  One row per conversion.  Raw email and phone never reach it:
 * xcapi_fire stores only the conversion object as it will be sent to X, with
 * identifiers already normalized and hashed.
 *
 * Life of a row: queued -> sending -> sent, or back to queued (with a later
 * next_attempt_at) after a failed attempt, or dead once the attempts are used
 * up or X rejects the conversion itself.  The worker turns rows it finds in
 * 'sending' at start-up back into 'queued': they were in flight when it died.
 */
CREATE TABLE @extschema@.xcapi_conversions (
    id               bigserial PRIMARY KEY,
    pixel_id         text NOT NULL,
    event_id         text NOT NULL,
    conversion_id    text NOT NULL,
    conversion_time  timestamptz NOT NULL,
    payload          json NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'sending', 'sent', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_http_status integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
) WITH (fillfactor = 70);

COMMENT ON TABLE @extschema@.xcapi_conversions IS
    'xcapi outbox: one row per conversion, queued until X has accepted it';

-- What the worker claims, what xcapi_wait watches: rows not yet finished.
CREATE INDEX xcapi_conversions_pending_idx
    ON @extschema@.xcapi_conversions (next_attempt_at, id)
    WHERE status IN ('queued', 'sending');

REVOKE ALL ON @extschema@.xcapi_conversions FROM PUBLIC;
REVOKE ALL ON SEQUENCE @extschema@.xcapi_conversions_id_seq FROM PUBLIC;

CREATE FUNCTION @extschema@.xcapi_fire(
    pixel           text,
    event_id        text,
    conversion_id   text DEFAULT NULL,
    value           numeric DEFAULT NULL,
    contents        jsonb DEFAULT NULL,
    email           text DEFAULT NULL,
    phone           text DEFAULT NULL,
    twclid          text DEFAULT NULL,
    ip_address      text DEFAULT NULL,
    user_agent      text DEFAULT NULL,
    currency        text DEFAULT NULL,
    number_items    integer DEFAULT NULL,
    description     text DEFAULT NULL,
    conversion_time timestamptz DEFAULT now())
RETURNS bigint
AS 'MODULE_PATHNAME', 'xcapi_fire'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION @extschema@.xcapi_fire(text, text, text, numeric, jsonb,
    text, text, text, text, text, text, integer, text, timestamptz) IS
    'validate a conversion, hash its identifiers and queue it for delivery to X; returns its id';

CREATE FUNCTION @extschema@.xcapi_fire_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'xcapi_fire_trigger'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION @extschema@.xcapi_fire_trigger() IS
    'AFTER INSERT/UPDATE row trigger: arguments pixel, event id, then field=column pairs';

CREATE FUNCTION @extschema@.xcapi_wait(timeout interval DEFAULT '30s')
RETURNS boolean
AS 'MODULE_PATHNAME', 'xcapi_wait'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

COMMENT ON FUNCTION @extschema@.xcapi_wait(interval) IS
    'wait until no conversion is queued or sending (true) or the timeout passes (false)';

CREATE FUNCTION @extschema@.xcapi_retry(
    ids      bigint[] DEFAULT NULL,
    pixel    text DEFAULT NULL,
    error_like text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'xcapi_retry'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION @extschema@.xcapi_retry(bigint[], text, text) IS
    'put dead conversions back in the queue (all, or those matching ids, pixel and error pattern); returns how many';

CREATE VIEW @extschema@.xcapi_stats AS
SELECT c.pixel_id,
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
 GROUP BY c.pixel_id;

COMMENT ON VIEW @extschema@.xcapi_stats IS
    'per pixel: conversions by status, recent sends, oldest queued age, last error';

REVOKE ALL ON @extschema@.xcapi_stats FROM PUBLIC;

/*
 * Test entry points for the pure parts (pg_regress checks them against
 * published vectors).  They see no stored secret: the caller passes its own.
 */
CREATE FUNCTION @extschema@.xcapi_percent_encode(text)
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_percent_encode'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION @extschema@.xcapi_oauth_base_string(
    method text, url text, params text[])
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_oauth_base_string'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION @extschema@.xcapi_oauth_base_string(text, text, text[]) IS
    'OAuth 1.0a signature base string; params is a flat array of decoded name, value pairs';

CREATE FUNCTION @extschema@.xcapi_oauth_signature(
    base_string text, consumer_secret text, token_secret text)
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_oauth_signature'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION @extschema@.xcapi_oauth_signature(text, text, text) IS
    'OAuth 1.0a HMAC-SHA1 signature (base64) of a base string';

CREATE FUNCTION @extschema@.xcapi_oauth_header(
    method text, url text,
    consumer_key text, consumer_secret text,
    token text, token_secret text,
    oauth_nonce text DEFAULT NULL, oauth_timestamp bigint DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_oauth_header'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION @extschema@.xcapi_oauth_header(text, text, text, text, text, text, text, bigint) IS
    'the Authorization header the worker sends for a JSON POST to url; a fresh nonce and timestamp unless given';

CREATE FUNCTION @extschema@.xcapi_hash_email(text)
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_hash_email'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION @extschema@.xcapi_normalize_phone(text)
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_normalize_phone'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION @extschema@.xcapi_hash_phone(text)
RETURNS text
AS 'MODULE_PATHNAME', 'xcapi_hash_phone'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

REVOKE ALL ON FUNCTION @extschema@.xcapi_fire(text, text, text, numeric, jsonb,
    text, text, text, text, text, text, integer, text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.xcapi_fire_trigger() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.xcapi_wait(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.xcapi_retry(bigint[], text, text) FROM PUBLIC;
