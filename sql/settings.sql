-- settings, privileges, and what a non-superuser can see
\set VERBOSITY terse

SELECT name, setting, unit, context FROM pg_settings WHERE name LIKE 'xcapi.%' ORDER BY name;

-- reload-only settings cannot be changed in a session
SET xcapi.batch_size = 100;
SET xcapi.credentials_file = '/tmp/x';

-- a misspelled xcapi.* setting is reported (prefix reserved)
SET xcapi.batchsize = 10;

-- the worker is there and named (it connects once pg_regress has made the database)
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        PERFORM 1 FROM pg_stat_activity WHERE backend_type = 'xcapi worker';
        EXIT WHEN FOUND;
        PERFORM pg_sleep(0.1);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
END
$$;
SELECT backend_type, application_name FROM pg_stat_activity WHERE backend_type = 'xcapi worker';

-- privileges: PUBLIC can neither enqueue nor read the queue
CREATE ROLE xcapi_analyst LOGIN;
CREATE ROLE xcapi_app LOGIN;
SET ROLE xcapi_analyst;
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'a@example.com');
SELECT count(*) FROM xcapi_conversions;
SELECT count(*) FROM xcapi_stats;
SELECT xcapi_retry();
-- settings naming secret files are hidden from non-superusers
SHOW xcapi.credentials_file;
SELECT count(*) AS visible FROM pg_settings WHERE name IN ('xcapi.credentials_file', 'xcapi.ca_file');
RESET ROLE;

-- EXECUTE is enough to enqueue, and gives no read access
GRANT EXECUTE ON FUNCTION xcapi_fire(text, text, text, numeric, jsonb, text, text, text, text, text, text, integer, text, timestamptz) TO xcapi_analyst;
SET ROLE xcapi_analyst;
SELECT xcapi_fire('o8z6j', 'o8z2x', email => 'analyst@example.com', conversion_id => 'by-analyst') > 0 AS fired;
SELECT count(*) FROM xcapi_conversions;
RESET ROLE;
SELECT conversion_id, status IN ('queued', 'sending') AS pending FROM xcapi_conversions WHERE conversion_id = 'by-analyst';

-- a trigger on a table owned by an application role with only EXECUTE
GRANT EXECUTE ON FUNCTION xcapi_fire_trigger() TO xcapi_app;
GRANT CREATE ON SCHEMA public TO xcapi_app;
SET ROLE xcapi_app;
CREATE TABLE app_orders (id int PRIMARY KEY, email text);
CREATE TRIGGER app_orders_to_x AFTER INSERT ON app_orders
    FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'o8z2x', 'email=email');
INSERT INTO app_orders VALUES (1, 'app@example.com');
SELECT count(*) FROM xcapi_conversions;
RESET ROLE;
SELECT conversion_id FROM xcapi_conversions WHERE conversion_id = 'app_orders-1';
DROP TABLE app_orders;
REVOKE CREATE ON SCHEMA public FROM xcapi_app;
DROP OWNED BY xcapi_analyst, xcapi_app;
DROP ROLE xcapi_analyst, xcapi_app;
