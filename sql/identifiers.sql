-- Identifier normalization and hashing (x-conversions-api.md §3)
\set VERBOSITY default

-- §3.4 vectors
SELECT xcapi_hash_email('test-email@test.com') AS x_reference_email;
SELECT xcapi_hash_email('test@twitter.com') AS x_example_email;
SELECT xcapi_hash_email('test@x.com') AS doc_bug_email_is_not_d360;
SELECT xcapi_hash_phone('+11234567890') AS x_example_phone;
SELECT encode(sha256('11234567890'), 'hex') AS without_plus_differs;

-- email: trimmed and lower-cased before hashing
SELECT xcapi_hash_email(e) = xcapi_hash_email('test-email@test.com') AS same_hash, e
  FROM (VALUES ('  Test-Email@TEST.com '), (E'\ttest-email@test.com\n')) AS v(e);

-- an existing SHA-256 hex digest is taken as it is (lower-cased), never hashed twice
SELECT xcapi_hash_email('E586883B2B4FAF78D48300A79E0E15138D664CDF796FFB86E533170A9893EDA8');
SELECT xcapi_hash_phone('1fa6b8d986d9b9cd01bf36951815158bbde9f520c0567c835dfe34783d0a4231');

-- phone: E.164
SELECT p AS input, xcapi_normalize_phone(p) AS e164
  FROM (VALUES ('+1 (123) 456-7890'), ('+44 20 7946 0958'), ('0044 20 7946 0958'),
               ('+33.1.23.45.67.89'), ('  +81-3-1234-5678  ')) AS v(p);
SELECT xcapi_hash_phone('+1 (123) 456-7890') = xcapi_hash_phone('+11234567890') AS formatting_ignored;

-- refused
SELECT xcapi_hash_email('');
SELECT xcapi_hash_email('   ');
SELECT xcapi_hash_email('no-at-sign.example.com');
SELECT xcapi_hash_email('two@@example.com');
SELECT xcapi_hash_email('@example.com');
SELECT xcapi_hash_email('user@');
SELECT xcapi_hash_email('us er@example.com');
SELECT xcapi_hash_email(repeat('a', 250) || '@example.com');
SELECT xcapi_normalize_phone('(123) 456-7890');
SELECT xcapi_normalize_phone('+0123456789');
SELECT xcapi_normalize_phone('+1 234');
SELECT xcapi_normalize_phone('+1234567890123456');
SELECT xcapi_normalize_phone('+1 800 FLOWERS');
SELECT xcapi_normalize_phone('');
