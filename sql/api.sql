-- xcapi_fire, the outbox, xcapi_wait, xcapi_retry, xcapi_stats
\set VERBOSITY default

-- The worker of this test instance has no credentials: rows stay queued
-- (it may hold one in 'sending' for an instant), so "pending" is stable.

-- one conversion with every field
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x',
                  conversion_id => 'order-1001',
                  value => 20,
                  contents => '[{"content_id": "1", "content_name": "Blankets",
                                 "content_type": "Pet supplies", "content_price": 100.99,
                                 "num_items": 1, "content_group_id": 123}]',
                  email => '  Test-Email@Test.com ',
                  phone => '+1 (123) 456-7890',
                  twclid => '23opevjt88psuo13lu8d020qkn',
                  ip_address => '1.0.0.0',
                  user_agent => 'Mozilla/5.0 (Macintosh)',
                  currency => 'usd',
                  number_items => 3,
                  description => 'Pet supply purchases') > 0 AS fired;

SELECT pixel_id, event_id, conversion_id, status IN ('queued', 'sending') AS pending,
       jsonb_pretty(payload::jsonb - 'conversion_time') AS payload
  FROM xcapi_conversions WHERE conversion_id = 'order-1001';

-- the stored payload is the exact JSON X gets: X's key order, "value" a decimal string
SELECT regexp_replace(payload::text, '"conversion_time":"[^"]*"', '"conversion_time":"…"') AS stored
  FROM xcapi_conversions WHERE conversion_id = 'order-1001';
SELECT payload->>'conversion_time' ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$' AS x_time_format
  FROM xcapi_conversions WHERE conversion_id = 'order-1001';

-- no raw PII anywhere in the row
SELECT count(*) AS rows_with_raw_pii FROM xcapi_conversions c
 WHERE c::text ILIKE '%test-email%' OR c::text LIKE '%456-7890%' OR c::text LIKE '%11234567890%';

-- conversion_time is sent in UTC with milliseconds, whatever the session time zone
SET timezone = 'Asia/Tokyo';
SELECT date_trunc('hour', now()) - interval '1 hour' + interval '14 minutes 0.6039 seconds' AS t \gset
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'tz@example.com', conversion_id => 'tz-check',
                  conversion_time => :'t') AS id \gset
SELECT payload->>'conversion_time' = to_char(:'t'::timestamptz AT TIME ZONE 'UTC',
                                             'YYYY-MM-DD"T"HH24:MI:SS') || '.603Z' AS utc_with_millis
  FROM xcapi_conversions WHERE id = :id;
RESET timezone;

-- without conversion_id, one is derived from the outbox id (stable across resends)
SELECT xcapi_fire('o8z6j', 'o8z2x', twclid => 'abc') AS id \gset
SELECT conversion_id = 'xcapi-' || id AS derived, payload->>'conversion_id' = conversion_id AS in_payload
  FROM xcapi_conversions WHERE id = :id;

-- ip_address and user_agent together are enough; IPv6 is accepted
SELECT xcapi_fire('o8z6j', 'o8z2x', ip_address => ' 2001:db8::1 ', user_agent => 'curl/8') AS id \gset
SELECT payload->'identifiers' AS identifiers FROM xcapi_conversions WHERE id = :id;

-- value keeps at least two fraction digits; integers are accepted
CREATE TEMP TABLE fired_values AS
SELECT v, xcapi_fire('o8z6j', 'o8z2x', email => 'v@example.com', value => v) AS id
  FROM (VALUES (0), (7), (19.9), (20.125), (0.5), (7::numeric / 100), (1.100)) AS t(v);
SELECT f.v AS value_in, c.payload->>'value' AS value_sent
  FROM fired_values f JOIN xcapi_conversions c USING (id) ORDER BY f.v;

-- bad input is refused at the door, naming the argument; nothing is queued
SELECT count(*) AS before FROM xcapi_conversions \gset
SELECT xcapi_fire(NULL, 'o8z2x', email => 'a@example.com');
SELECT xcapi_fire('', 'o8z2x', email => 'a@example.com');
SELECT xcapi_fire('O8Z6J', 'o8z2x', email => 'a@example.com');
SELECT xcapi_fire('o8z6j!', 'o8z2x', email => 'a@example.com');
SELECT xcapi_fire(repeat('a', 65), 'o8z2x', email => 'a@example.com');
SELECT xcapi_fire('o8z6j', NULL, email => 'a@example.com');
SELECT xcapi_fire('o8z6j', '', email => 'a@example.com');
SELECT xcapi_fire('o8z6j', 'Purchase', email => 'a@example.com');
SELECT xcapi_fire('o8z6j', 'tw-o8z6j', email => 'a@example.com');
SELECT xcapi_fire('o8z6j', 'tw-abc12-o8z2x', email => 'a@example.com');
SELECT xcapi_fire('o8z6j', 'o8z2x');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => '   ', twclid => '');
SELECT xcapi_fire('o8z6j', 'o8z2x', ip_address => '1.2.3.4');
SELECT xcapi_fire('o8z6j', 'o8z2x', user_agent => 'Mozilla/5.0');
SELECT xcapi_fire('o8z6j', 'o8z2x', ip_address => '1.2.3.400', user_agent => 'x');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'not-an-email');
SELECT xcapi_fire('o8z6j', 'o8z2x', phone => '555-1234');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', value => 'NaN');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', value => 'Infinity');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', value => -0.01);
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', currency => 'US');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', currency => 'US$');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', number_items => 0);
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', number_items => -2);
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '{"content_id": "1"}');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '"x"');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[1]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{"sku": "1"}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{"content_price": "9.99"}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{"content_price": -1}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{"content_id": "1"}, {"num_items": 1.5}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{"num_items": 0}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', contents => '[{"content_name": ["a"]}]');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', conversion_id => repeat('x', 257));
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', conversion_id => '  ');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', description => repeat('d', 1025));
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', user_agent => repeat('u', 1025));
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', twclid => repeat('t', 257));
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', conversion_time => NULL);
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', conversion_time => 'infinity');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', conversion_time => now() + interval '11 minutes');
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com', conversion_time => now() - interval '91 days');
SELECT count(*) = :before AS nothing_queued FROM xcapi_conversions;

-- an error rolls back the whole statement, as any ERROR does
SELECT count(xcapi_fire('o8z6j', 'o8z2x', email => CASE WHEN g = 3 THEN 'bad' ELSE 'ok' || g || '@example.com' END))
  FROM generate_series(1, 5) g;
SELECT count(*) = :before AS still_nothing_queued FROM xcapi_conversions;

-- xcapi_wait: false on timeout while something is queued; refuses what cannot work
SELECT xcapi_wait('50 ms') AS drained;
BEGIN;
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'same-xact@example.com') > 0 AS fired;
SELECT xcapi_wait('1 s');
ROLLBACK;
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT xcapi_wait('1 s');
ROLLBACK;
SELECT count(*) AS rolled_back_rows FROM xcapi_conversions WHERE payload::text LIKE '%' || xcapi_hash_email('same-xact@example.com') || '%';

-- xcapi_retry: dead rows back in the queue, filtered by ids, pixel, error
UPDATE xcapi_conversions SET status = 'dead', next_attempt_at = NULL, attempts = 12, last_http_status = 400,
       last_error = 'HTTP 400: INVALID_PARAMETER: hashed_email (abc) is not a valid SHA-256 hash'
 WHERE conversion_id IN ('order-1001', 'tz-check');
SELECT xcapi_retry(ids => ARRAY[-1]) AS none_by_id;
SELECT xcapi_retry(pixel => 'zzzzz') AS none_by_pixel;
SELECT xcapi_retry(error_like => '%event_id%') AS none_by_error;
SELECT xcapi_retry(error_like => '%SHA-256%', pixel => 'o8z6j') AS requeued;
SELECT conversion_id, status IN ('queued', 'sending') AS pending, attempts
  FROM xcapi_conversions WHERE conversion_id IN ('order-1001', 'tz-check') ORDER BY 1;
SELECT xcapi_retry() AS nothing_dead_left;

-- xcapi_stats
SELECT pixel_id, queued + sending AS pending, sent, dead, oldest_queued_age > interval '0' AS has_age
  FROM xcapi_stats ORDER BY pixel_id;
