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

-- Rows fired by AFTER ROW triggers are written together when the statement
-- ends.  They are there for the next statement of the same transaction,
-- live and die with the (sub)transaction that fired them, and keep every
-- row of a statement larger than one batch (1,000 rows).
CREATE TABLE orders (id int PRIMARY KEY, email text);
CREATE TRIGGER orders_to_x AFTER INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'ord01', 'email=email');
BEGIN;
INSERT INTO orders SELECT g, 'o' || g || '@example.com' FROM generate_series(1, 2500) g;
SELECT count(*) AS seen_in_same_transaction, count(DISTINCT id) AS distinct_ids,
       count(*) FILTER (WHERE conversion_id <> payload::jsonb->>'conversion_id') AS mismatched
  FROM xcapi_conversions WHERE event_id = 'ord01';
SAVEPOINT s1;
INSERT INTO orders VALUES (2501, 'x@example.com'), (2502, 'y@example.com');
ROLLBACK TO SAVEPOINT s1;
SAVEPOINT s2;
INSERT INTO orders VALUES (2503, 'z@example.com');
RELEASE SAVEPOINT s2;
COMMIT;
SELECT count(*) AS after_savepoints,
       count(*) FILTER (WHERE conversion_id IN ('orders-2501', 'orders-2502')) AS rolled_back,
       count(*) FILTER (WHERE conversion_id = 'orders-2503') AS released
  FROM xcapi_conversions WHERE event_id = 'ord01';

-- A statement that fails after its trigger fired queues nothing, and the
-- rows of an outer statement survive an inner block that fails.
CREATE TABLE refunds (id int PRIMARY KEY, email text);
CREATE TRIGGER r1_to_x AFTER INSERT ON refunds
    FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'ref01', 'email=email');
CREATE FUNCTION refuse_big_refund() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.email LIKE 'refuse%' THEN
        RAISE EXCEPTION 'refund % refused', NEW.id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER r2_refuse AFTER INSERT ON refunds
    FOR EACH ROW EXECUTE FUNCTION refuse_big_refund();
INSERT INTO refunds VALUES (1, 'a@example.com'), (2, 'refuse@example.com');
SELECT count(*) AS after_failed_statement FROM xcapi_conversions WHERE event_id = 'ref01';
-- each order also books a refund in a block that swallows its failure: the
-- refund's own statement fails (refuse), or the block fails after it (undo)
CREATE FUNCTION book_refund() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO refunds VALUES (NEW.id, NEW.email);
        IF NEW.email LIKE 'undo%' THEN
            RAISE EXCEPTION 'refund % undone', NEW.id;
        END IF;
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN NULL;
END $$;
CREATE TRIGGER orders_z_refund AFTER INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION book_refund();
INSERT INTO orders VALUES (7001, 'p@example.com'), (7002, 'refuse@example.com'),
                          (7003, 'undo@example.com'), (7004, 'r@example.com');
SELECT event_id, string_agg(conversion_id, ', ' ORDER BY conversion_id) AS queued
  FROM xcapi_conversions WHERE conversion_id ~ '^(orders|refunds)-700[1-4]$'
 GROUP BY event_id ORDER BY event_id;
-- the same with 1,000 order rows waiting when the last order's refund
-- fires: that refund cannot wait with them and is written at once, inside
-- the block, which then fails and takes it back
INSERT INTO orders
SELECT 20000 + g, CASE WHEN g = 1000 THEN 'undo@example.com' ELSE 'b' || g || '@example.com' END
  FROM generate_series(1, 1000) g;
SELECT count(*) FILTER (WHERE event_id = 'ord01') AS orders_queued,
       count(*) FILTER (WHERE event_id = 'ref01') AS refunds_queued,
       count(*) FILTER (WHERE conversion_id = 'refunds-21000') AS undone_refund
  FROM xcapi_conversions WHERE conversion_id ~ '^(orders|refunds)-2[01][0-9]{3}$';
DROP TRIGGER orders_z_refund ON orders;

-- a deferred constraint trigger fires at commit, and its rows are kept
CREATE CONSTRAINT TRIGGER orders_at_commit AFTER INSERT ON orders
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'ord02', 'email=email');
BEGIN;
INSERT INTO orders VALUES (3001, 'd1@example.com'), (3002, 'd2@example.com');
SELECT count(*) AS deferred_before_commit FROM xcapi_conversions WHERE event_id = 'ord02';
COMMIT;
SELECT count(*) AS deferred_after_commit FROM xcapi_conversions WHERE event_id = 'ord02';
DROP TABLE orders, refunds;
DROP FUNCTION refuse_big_refund(), book_refund();
