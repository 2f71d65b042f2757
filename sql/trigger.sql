-- xcapi_fire_trigger: mapping columns of a business table to conversions
\set VERBOSITY default

CREATE TABLE payments (
    id          bigserial PRIMARY KEY,
    customer_email text,
    amount      numeric(12,2) NOT NULL,
    currency    text NOT NULL DEFAULT 'USD',
    items       integer,
    basket      jsonb,
    paid_at     timestamptz NOT NULL DEFAULT now(),
    status      text NOT NULL DEFAULT 'paid'
);

CREATE TRIGGER payments_to_x AFTER INSERT ON payments
    FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger(
        'o8z6j', 'tw-o8z6j-o8z2x', 'value=amount', 'currency=currency',
        'email=customer_email', 'number_items=items', 'contents=basket',
        'conversion_time=paid_at');

INSERT INTO payments (customer_email, amount, currency, items, basket)
VALUES ('Buyer@Example.com', 49.5, 'eur', 2, '[{"content_id": "sku-1", "num_items": 2}]');

-- no conversion_id mapped: "<table>-<primary key>", stable for the row
SELECT conversion_id, payload::jsonb->>'value' AS value, payload::jsonb->>'price_currency' AS currency,
       payload::jsonb->'number_items' AS number_items, payload::jsonb->'contents' AS contents,
       payload::jsonb->'identifiers'->0->>'hashed_email' = xcapi_hash_email('buyer@example.com') AS email_hashed
  FROM xcapi_conversions WHERE conversion_id LIKE 'payments-%';

-- a rolled-back payment queues nothing
BEGIN;
INSERT INTO payments (customer_email, amount) VALUES ('rollback@example.com', 1);
ROLLBACK;
SELECT count(*) AS after_rollback FROM xcapi_conversions WHERE conversion_id LIKE 'payments-%';

-- a multi-row insert fires once per row
INSERT INTO payments (customer_email, amount)
SELECT 'bulk' || g || '@example.com', g FROM generate_series(1, 100) g;
SELECT count(*) AS after_bulk FROM xcapi_conversions WHERE conversion_id LIKE 'payments-%';

-- bad input in a row fails the INSERT with the argument named
INSERT INTO payments (customer_email, amount) VALUES (NULL, 5);
INSERT INTO payments (customer_email, amount) VALUES ('no-at-sign', 5);
INSERT INTO payments (customer_email, amount, currency) VALUES ('x@example.com', 5, 'dollars');

-- AFTER UPDATE with a WHEN clause, explicit conversion_id mapping
CREATE TABLE signups (user_id uuid PRIMARY KEY, email text, phone text, confirmed boolean DEFAULT false);
CREATE TRIGGER signup_confirmed AFTER UPDATE ON signups
    FOR EACH ROW WHEN (NEW.confirmed AND NOT OLD.confirmed)
    EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'abc12', 'conversion_id=user_id', 'email=email', 'phone=phone');
INSERT INTO signups VALUES ('6f1c1b3e-0000-4000-8000-000000000001', 'new@example.com', '+1 415 555 0100');
SELECT count(*) AS before_confirm FROM xcapi_conversions WHERE event_id = 'abc12';
UPDATE signups SET confirmed = true;
UPDATE signups SET email = 'changed@example.com';
SELECT conversion_id, payload::jsonb->'identifiers'->1->>'hashed_phone_number' = xcapi_hash_phone('+14155550100') AS phone_hashed
  FROM xcapi_conversions WHERE event_id = 'abc12';

-- bad mappings are refused by CREATE TRIGGER itself, naming trigger and argument
CREATE TABLE bad (id int PRIMARY KEY, email text, amount text, created date);
CREATE TRIGGER t1 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'mail=email');
CREATE TRIGGER t2 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=e_mail');
CREATE TRIGGER t3 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email', 'value=amount');
CREATE TRIGGER t4 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email');
CREATE TRIGGER t5 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j');
CREATE TRIGGER t6 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'tw-zzzzz-o8z2x', 'email=email');
CREATE TRIGGER t7 BEFORE INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email');
CREATE TRIGGER t7 AFTER DELETE ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email');
CREATE TRIGGER t7 AFTER INSERT ON bad FOR EACH STATEMENT EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email');
CREATE TRIGGER t8 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email', 'email=amount');
CREATE TABLE nopk (email text);
CREATE TRIGGER t9 AFTER INSERT ON nopk FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email');
SELECT count(*) AS no_trigger_was_created FROM pg_trigger WHERE tgrelid IN ('bad'::regclass, 'nopk'::regclass);
INSERT INTO bad VALUES (1, 'a@example.com', '1', current_date);
SELECT xcapi_fire_trigger();

-- a trigger created while xcapi's checks were bypassed still fails on its first row
ALTER EVENT TRIGGER xcapi_check_new_triggers DISABLE;
CREATE TRIGGER t1 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'mail=email');
ALTER EVENT TRIGGER xcapi_check_new_triggers ENABLE;
INSERT INTO bad VALUES (2, 'a@example.com', '1', current_date);
DROP TRIGGER t1 ON bad;

-- a date column works as conversion_time; a column dropped later is noticed
CREATE TRIGGER t10 AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email', 'conversion_time=created');
INSERT INTO bad VALUES (10, 'a@example.com', '1', current_date);
SELECT conversion_id, (payload::jsonb->>'conversion_time')::timestamptz = current_date::timestamptz AS date_used
  FROM xcapi_conversions WHERE conversion_id = 'bad-10';
ALTER TABLE bad DROP COLUMN created;
INSERT INTO bad VALUES (11, 'a@example.com', '1');
