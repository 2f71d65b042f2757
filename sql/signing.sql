-- OAuth 1.0a signing against published vectors (x-conversions-api.md §6.3-6.9)
\set VERBOSITY terse

-- §6.3 percent-encoding: RFC 3986 unreserved set, upper-case hex, UTF-8 bytes
SELECT input, xcapi_percent_encode(input) AS encoded
  FROM (VALUES ('Ladies + Gentlemen'), ('An encoded string!'),
               ('Dogs, Cats & Mice'), ('☃'), ('-._~*''()!'), ('')) AS v(input);

-- §6.9.1 X's published example, api.x.com form
SELECT xcapi_oauth_base_string('POST',
    'https://api.x.com/1.1/statuses/update.json?include_entities=true',
    ARRAY['status', 'Hello Ladies + Gentlemen, a signed OAuth request!',
          'oauth_consumer_key', 'xvz1evFS4wEEPTGEFPHBog',
          'oauth_nonce', 'kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg',
          'oauth_signature_method', 'HMAC-SHA1',
          'oauth_timestamp', '1318622958',
          'oauth_token', '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
          'oauth_version', '1.0']) AS base \gset
SELECT :'base' = 'POST&https%3A%2F%2Fapi.x.com%2F1.1%2Fstatuses%2Fupdate.json&include_entities%3Dtrue%26oauth_consumer_key%3Dxvz1evFS4wEEPTGEFPHBog%26oauth_nonce%3DkYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg%26oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D1318622958%26oauth_token%3D370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb%26oauth_version%3D1.0%26status%3DHello%2520Ladies%2520%252B%2520Gentlemen%252C%2520a%2520signed%2520OAuth%2520request%2521'
       AS base_matches_x;
SELECT xcapi_oauth_signature(:'base',
    'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
    'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE') AS x_example_signature;

-- the same with the old api.twitter.com host (hCtSmYh+iHYCEqBWrE7C7hYmtUk=)
SELECT xcapi_oauth_signature(
    xcapi_oauth_base_string('POST',
        'https://api.twitter.com/1.1/statuses/update.json?include_entities=true',
        ARRAY['status', 'Hello Ladies + Gentlemen, a signed OAuth request!',
              'oauth_consumer_key', 'xvz1evFS4wEEPTGEFPHBog',
              'oauth_nonce', 'kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '1318622958',
              'oauth_token', '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
              'oauth_version', '1.0']),
    'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
    'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE') AS twitter_host_signature;

-- and with the API v1 URL, the stale value on X's "Authorizing a request" page
SELECT xcapi_oauth_signature(
    xcapi_oauth_base_string('POST',
        'https://api.twitter.com/1/statuses/update.json?include_entities=true',
        ARRAY['status', 'Hello Ladies + Gentlemen, a signed OAuth request!',
              'oauth_consumer_key', 'xvz1evFS4wEEPTGEFPHBog',
              'oauth_nonce', 'kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '1318622958',
              'oauth_token', '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
              'oauth_version', '1.0']),
    'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
    'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE') AS api_v1_signature;

-- §6.9.2 RFC 5849 §3.4.1: duplicate names sorted by value, empty values,
-- "@", "+" in the query as a space, double encoding of "%"
SELECT xcapi_oauth_base_string('POST',
    'http://EXAMPLE.COM:80/request?b5=%3D%253D&a3=a&c%40=&a2=r%20b',
    ARRAY['oauth_consumer_key', '9djdj82h48djs9d2',
          'oauth_token', 'kkk9d7dh3k39sjv7',
          'oauth_signature_method', 'HMAC-SHA1',
          'oauth_timestamp', '137131201',
          'oauth_nonce', '7d8f3e4a',
          'c2', '', 'a3', '2 q']) AS rfc_base \gset
SELECT :'rfc_base' = 'POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q%26a3%3Da%26b5%3D%253D%25253D%26c%2540%3D%26c2%3D%26oauth_consumer_key%3D9djdj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk9d7dh3k39sjv7'
       AS rfc_base_matches;

-- §6.9.3 signatures over that base string (RFC errata 2550 value; oauthlib's key-encoding vector)
SELECT xcapi_oauth_signature(:'rfc_base', 'j49sk3j29djd', 'dh893hdasih9') AS rfc_errata_signature;
SELECT xcapi_oauth_signature(:'rfc_base',
    'ECrDNoq1VYzzzzzzzzzyAK7TwZNtPnkqatqZZZZ', 'just-a-string    asdasd') AS oauthlib_signature;

-- §6.9.4 RFC 5849 §1.2 GET with query, no oauth_version; then https; then OAuth Core 1.0 Appendix A
SELECT xcapi_oauth_signature(
    xcapi_oauth_base_string('GET',
        'http://photos.example.net/photos?file=vacation.jpg&size=original',
        ARRAY['oauth_consumer_key', 'dpf43f3p2l4k3l03',
              'oauth_token', 'nnch734d00sl2jdk',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '137131202',
              'oauth_nonce', 'chapoH']),
    'kd94hf93k423kf44', 'pfkkdhi9sl3r4s00') AS rfc_get_http,
       xcapi_oauth_signature(
    xcapi_oauth_base_string('GET',
        'https://photos.example.net/photos?file=vacation.jpg&size=original',
        ARRAY['oauth_consumer_key', 'dpf43f3p2l4k3l03',
              'oauth_token', 'nnch734d00sl2jdk',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '137131202',
              'oauth_nonce', 'chapoH']),
    'kd94hf93k423kf44', 'pfkkdhi9sl3r4s00') AS rfc_get_https,
       xcapi_oauth_signature(
    xcapi_oauth_base_string('GET',
        'http://photos.example.net/photos?file=vacation.jpg&size=original',
        ARRAY['oauth_consumer_key', 'dpf43f3p2l4k3l03',
              'oauth_token', 'nnch734d00sl2jdk',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '1191242096',
              'oauth_nonce', 'kllo9940pd9333jh',
              'oauth_version', '1.0']),
    'kd94hf93k423kf44', 'pfkkdhi9sl3r4s00') AS core_appendix_a;

-- §6.9.5 empty token secret; multi-byte UTF-8 in a parameter
SELECT xcapi_oauth_signature(
    xcapi_oauth_base_string('POST', 'https://api.twitter.com/oauth/request_token',
        ARRAY['oauth_callback', 'http://localhost:3005/the_dance/process_callback?service_provider_id=11',
              'oauth_consumer_key', 'GDdmIQH6jhtmLUypg82g',
              'oauth_nonce', 'QP70eNmVz8jvdPevU3oJD2AfF7R7odC2XJcn4XlZJqk',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '1272323042',
              'oauth_version', '1.0']),
    'MCD8BKwGdgPHvAuvgvz4EQpqDAtx89grbuNMRd7Eh98', '') AS empty_token_secret;
SELECT xcapi_oauth_signature(
    xcapi_oauth_base_string('POST', 'http://api.twitter.com/1/statuses/update.json',
        ARRAY['oauth_consumer_key', 'GDdmIQH6jhtmLUypg82g',
              'oauth_nonce', 'oElnnMTQIZvqvlfXM56aBLAf5noGD0AQR3Fmi7Q6Y',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_token', '819797-Jxq8aYUDRmykzVKrgoLhXSq67TEa5ruc4GJC2rWimw',
              'oauth_timestamp', '1272325550',
              'oauth_version', '1.0',
              'status', 'setting up my twitter 私のさえずりを設定する']),
    'MCD8BKwGdgPHvAuvgvz4EQpqDAtx89grbuNMRd7Eh98',
    'J6zix3FfA9LofH0awS24M3HcBYXO5nI1iYe8EfBA') AS utf8_signature;

-- §6.9.6 the header the worker sends for a conversions POST (JSON body not signed)
SELECT xcapi_oauth_header('POST',
    'https://ads-api.x.com/12/measurement/conversions/oka17',
    'xvz1evFS4wEEPTGEFPHBog', 'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
    '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
    'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE',
    'kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg', 1318622958) AS conversions_header;

-- host and version variants; an explicit :443 is the default port and dropped
SELECT substring(xcapi_oauth_header('POST', url,
    'xvz1evFS4wEEPTGEFPHBog', 'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
    '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
    'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE',
    'kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg', 1318622958)
    FROM 'oauth_signature="([^"]*)"') AS signature, url
  FROM (VALUES ('https://ads-api.twitter.com/12/measurement/conversions/oka17'),
               ('https://ads-api.x.com/11/measurement/conversions/oka17'),
               ('HTTPS://ADS-API.X.COM:443/12/measurement/conversions/oka17')) AS v(url);

-- style B (oauth_body_hash of the exact body bytes) through the base string
SELECT xcapi_oauth_signature(
    xcapi_oauth_base_string('POST', 'https://ads-api.x.com/12/measurement/conversions/oka17',
        ARRAY['oauth_body_hash', 'cuDNc1E94k08i3MWWGY3SB3YxRI=',
              'oauth_consumer_key', 'xvz1evFS4wEEPTGEFPHBog',
              'oauth_nonce', 'kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg',
              'oauth_signature_method', 'HMAC-SHA1',
              'oauth_timestamp', '1318622958',
              'oauth_token', '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
              'oauth_version', '1.0']),
    'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
    'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE') AS body_hash_signature;

-- a fresh nonce and timestamp each call: two headers never repeat
SELECT count(DISTINCT h) AS distinct_headers,
       bool_and(h ~ 'oauth_nonce="[A-Za-z0-9]{32}"') AS nonce_is_32_alnum,
       bool_and(abs(substring(h FROM 'oauth_timestamp="([0-9]+)"')::bigint
                    - extract(epoch FROM now())::bigint) < 60) AS timestamp_is_now
  FROM (SELECT xcapi_oauth_header('POST', 'https://ads-api.x.com/12/measurement/conversions/oka17',
                                  'ck', 'cs', 'tok', 'ts') AS h
          FROM generate_series(1, 100)) s;

-- argument errors
SELECT xcapi_oauth_base_string('POST', 'https://x.test/', ARRAY['odd']);
SELECT xcapi_oauth_base_string('POST', 'no-scheme', ARRAY[]::text[]);
SELECT xcapi_oauth_header('POST', 'https://x.test/', NULL, 'cs', 'tok', 'ts');
SELECT xcapi_oauth_header('POST', 'https://x.test/', 'ck', 'cs', 'tok', 'ts', 'n', -1);
