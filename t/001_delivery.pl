
# Copyright (c) 2026, the xcapi authors
#
# t/001_delivery.pl -- end-to-end delivery against a local mock of X
# (t/mock_x.py): batching, transactions, commit wake-up latency, both auth
# schemes, fresh OAuth nonces, retry after 503, SIGHUP reload, worker restart.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use Digest::SHA qw(sha256_hex);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use XcapiTest;

my $t_start = time();

# The mock validates its own behaviour first: a broken mock would make every
# assertion below meaningless.
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ $ENV{XCAPI_PYTHON} // '/usr/bin/python3',
			"$FindBin::RealBin/mock_x_selftest.py" ],
		'>', \$out, '2>', \$err);
	ok($ok, 'mock_x self-test passes')
	  or diag "$out\n$err";
}

my $mock = start_mock();
my $node = xcapi_node('primary', $mock, conf => <<'EOC');
xcapi.retry_base = 100
EOC

# Any failure below: print the server log, the rows and the mock's records.
END { on_failure_dump($node, $mock) if $node; }

# Fire a SQL snippet and wait (inside the server) until nothing is pending.
sub fire_and_wait
{
	my ($sql, $what, $timeout) = @_;
	$node->safe_psql('postgres', $sql);
	my $done = $node->safe_psql('postgres',
		"SELECT xcapi_wait('" . ($timeout // 60) . "s')");
	is($done, 't', "xcapi_wait returns true: $what");
}

sub sent_count
{
	my ($where) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM xcapi_conversions WHERE status = 'sent' AND ($where)");
}

######################################################################
# 1. The worker is there.

ok( wait_until(
		sub {
			$node->safe_psql('postgres',
				"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'xcapi worker'"
			) eq '1';
		},
		30,
		'one xcapi worker in pg_stat_activity'),
	'one xcapi worker is running');

######################################################################
# 2. 1,000 conversions in one transaction: two full batches of 500.

my $mark = $mock->mark;
fire_and_wait(<<'EOS', '1,000 conversions in one transaction');
BEGIN;
SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x',
                        conversion_id => 'c' || g,
                        value => g::numeric / 100,
                        email => 'user' || g || '@example.com',
                        currency => 'usd'))
  FROM generate_series(1, 1000) g;
COMMIT;
EOS

is( $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE status = 'sent') || '/' || count(*) FROM xcapi_conversions"
	),
	'1000/1000',
	'every row is sent');
is( $node->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM ONLY xcapi_conversions_intake) || '/' || (SELECT count(*) FROM ONLY xcapi_conversions WHERE status = 'sent')"
	),
	'0/1000',
	'the worker filed every row from the intake into xcapi_conversions itself');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM xcapi_conversions WHERE sent_at IS NULL OR last_http_status IS DISTINCT FROM 200"
	),
	'0',
	'sent rows carry sent_at and HTTP status 200');

{
	my @acc = $mock->accepted($mark);
	my %seen;
	$seen{ $_->{conversion}{conversion_id} // '(none)' }++ for @acc;
	my @missing = grep { !$seen{"c$_"} } 1 .. 1000;
	my @dups = grep { $seen{$_} > 1 } sort keys %seen;
	my @extra = grep { !/^c([0-9]+)$/ || $1 < 1 || $1 > 1000 } sort keys %seen;
	is(scalar(@acc), 1000, 'the mock accepted 1,000 conversions');
	ok(!@missing && !@dups && !@extra,
		'each conversion_id accepted exactly once')
	  or diag sprintf("missing %d (%s...), duplicated %d (%s...), extra %s",
		scalar(@missing), join(',', @missing[ 0 .. ($#missing < 4 ? $#missing : 4) ]),
		scalar(@dups), join(',', @dups[ 0 .. ($#dups < 4 ? $#dups : 4) ]),
		join(',', @extra));

	my @req = $mock->requests($mark);
	is(scalar(@req), 2, 'two requests for 1,000 conversions');
	is( join(' ', map { ($_->{status} // 'none') . '/' . ($_->{n} // 'none') . '/' . $_->{auth} } @req),
		'200/500/oauth 200/500/oauth',
		'both requests: 200, 500 conversions, OAuth');
	is( join(' ', map { $_->{path} } @req),
		'/12/measurement/conversions/o8z6j /12/measurement/conversions/o8z6j',
		'path: /12/measurement/conversions/<pixel>');

	# The conversion objects themselves.
	my ($bad_hash, $bad_value, $bad_other) = (0, 0, 0);
	my $example;
	for my $a (@acc)
	{
		my $c = $a->{conversion};
		my ($g) = ($c->{conversion_id} // '') =~ /^c([0-9]+)$/ or next;
		my %ids = map { %$_ } @{ $c->{identifiers} || [] };
		$bad_hash++
		  unless ($ids{hashed_email} // '') eq sha256_hex(lc "user$g\@example.com")
		  && keys(%ids) == 1;
		$bad_value++
		  unless defined $c->{value}
		  && abs($c->{value} - $g / 100) < 1e-9;
		$bad_other++
		  unless $a->{pixel} eq 'o8z6j'
		  && $c->{event_id} eq 'tw-o8z6j-o8z2x'
		  && ($c->{price_currency} // '') eq 'USD';
		$example //= $c if $g == 7;
	}
	is($bad_hash,  0, 'hashed_email = sha256(lower-case email), the only identifier');
	is($bad_value, 0, 'value = g / 100');
	is($bad_other, 0, 'pixel, event_id and upper-cased currency as fired');
	note 'conversion c7 as X received it: ' . JSON::PP->new->canonical->encode($example // {});

	unlike($mock->raw_accepted, qr/\@example\.com/i,
		'no raw email reached the mock');
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM xcapi_conversions c WHERE c::text ILIKE '%\@example.com%'"
		),
		'0',
		'no raw email in the queue table');
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM xcapi_conversions WHERE payload::text LIKE '%' || encode(sha256(convert_to('user' || substr(conversion_id, 2) || '\@example.com', 'UTF8')), 'hex') || '%'"
		),
		'1000',
		'the stored payload holds the hashed email');
}

######################################################################
# 3. A rolled-back transaction sends nothing; normalization of a messy
#    email and phone.

$mark = $mock->mark;
$node->safe_psql('postgres', <<'EOS');
BEGIN;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'rolled-back-1',
                  email => 'rolled@example.com');
ROLLBACK;
EOS
fire_and_wait(<<'EOS', 'one conversion after a rollback');
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'after-rollback',
                  email => '  After.Rollback@Example.COM ',
                  phone => '+1 (123) 456-7890');
EOS
{
	my @acc = $mock->accepted($mark);
	my @after = grep { ($_->{conversion}{conversion_id} // '') eq 'after-rollback' } @acc;
	is(scalar(@after), 1, 'after-rollback delivered once');
	my %ids = map { %$_ } @{ $after[0]{conversion}{identifiers} || [] };
	is($ids{hashed_email}, sha256_hex('after.rollback@example.com'),
		'email trimmed and lower-cased before hashing');
	is($ids{hashed_phone_number},
		'1fa6b8d986d9b9cd01bf36951815158bbde9f520c0567c835dfe34783d0a4231',
		'phone normalized to E.164 (+11234567890) before hashing');
	my @rb = grep { ($_->{conversion}{conversion_id} // '') eq 'rolled-back-1' }
	  $mock->accepted;
	my @rbreq = grep { grep { ($_ // '') eq 'rolled-back-1' } @{ $_->{conversion_ids} } }
	  $mock->requests;
	ok(!@rb && !@rbreq, 'the rolled-back conversion never reached the mock');
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM xcapi_conversions WHERE conversion_id = 'rolled-back-1'"),
		'0',
		'and it is not in the table');
}

######################################################################
# 4. Latency while idle: the commit wakes the worker (its safety-net nap
#    is 10 s, so delivery in under a second proves the wake-up).

sleep 2;    # let the worker settle into its nap (setup, not an assertion)
$mark = $mock->mark;
{
	my $t_before = time();
	my $out = $node->safe_psql('postgres', <<'EOS');
BEGIN;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'latency-1',
                  twclid => '23opevjt88psuo13lu8d020qkn');
COMMIT;
SELECT extract(epoch FROM clock_timestamp());
EOS
	my $t_after = time();
	my (undef, $t_commit) = split /\n/, $out;
	my @req;
	wait_until(
		sub {
			@req = grep { grep { ($_ // '') eq 'latency-1' } @{ $_->{conversion_ids} } }
			  $mock->requests($mark);
			scalar @req;
		},
		15,
		'latency-1 reaches the mock');
	ok(@req, 'latency-1 reached the mock');
	if (@req)
	{
		my $lat = $req[0]{t} - $t_commit;
		note sprintf(
			'commit-to-request latency %.1f ms (psql round trip %.1f ms, request after psql start %.1f ms)',
			$lat * 1000, ($t_after - $t_before) * 1000,
			($req[0]{t} - $t_before) * 1000);
		cmp_ok($lat, '<', 1.0, 'idle worker delivers within 1 s of commit');
		is($req[0]{status}, 200, 'and it was accepted');
	}
	ok(wait_until(sub { sent_count("conversion_id = 'latency-1'") eq '1' }, 15,
			'latency-1 sent'), 'latency-1 marked sent');
}

######################################################################
# 5. The X-Pixel-Token scheme for pixel pxtok1.

$mark = $mock->mark;
fire_and_wait(<<'EOS', 'one conversion for the pixel-token pixel');
SELECT xcapi_fire('pxtok1', 'tw-pxtok1-abc12', conversion_id => 'pixel-token-1',
                  email => 'pt@example.com', value => 20, currency => 'EUR');
EOS
{
	my @req = grep { $_->{pixel} eq 'pxtok1' } $mock->requests($mark);
	is(scalar(@req), 1, 'one request for pxtok1');
	is($req[0]{auth}, 'pixel_token', 'sent with X-Pixel-Token') if @req;
	is($req[0]{status}, 200, 'accepted') if @req;
	my @acc = grep { ($_->{conversion}{conversion_id} // '') eq 'pixel-token-1' }
	  $mock->accepted($mark);
	is(scalar(@acc), 1, 'pixel-token-1 accepted once');
	like($mock->raw_accepted, qr/"conversion_id":"pixel-token-1".*"value":"?20\.0+"?[,}]|"value":"?20\.0+"?[,}].*"conversion_id":"pixel-token-1"/,
		'value 20 sent with a decimal point (the mock also insists on it)');
	is(sent_count("conversion_id = 'pixel-token-1'"), '1', 'row is sent');
}

######################################################################
# 6. A 503 from X: rows stay queued with the status and error, then go out
#    once X recovers.

$mark = $mock->mark;
$mock->set_faults({ force_status => 503 });
$node->safe_psql('postgres', <<'EOS');
SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'retry-' || g,
                        email => 'retry' || g || '@example.com'))
  FROM generate_series(1, 5) g;
EOS
ok( wait_until(
		sub {
			$node->safe_psql('postgres', <<'EOS') eq '5';
SELECT count(*) FROM xcapi_conversions
 WHERE conversion_id LIKE 'retry-%' AND status = 'queued'
   AND last_http_status = 503 AND last_error IS NOT NULL AND attempts >= 1
EOS
		},
		30,
		'rows queued after a 503'),
	'after a 503 the rows stay queued with last_http_status 503, last_error and attempts >= 1');
note 'during the 503: '
  . $node->safe_psql('postgres',
	"SELECT string_agg(DISTINCT attempts || ' attempts, ' || last_error, '; ') FROM xcapi_conversions WHERE conversion_id LIKE 'retry-%'"
  );
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'retry-%' AND status IN ('sent', 'dead')"
	),
	'0',
	'nothing sent or dead while X answers 503');
$mock->set_faults(undef);
ok( wait_until(sub { sent_count("conversion_id LIKE 'retry-%'") eq '5' },
		30, 'retried rows sent'),
	'after X recovers, the retried rows are sent');
{
	my @req = $mock->requests($mark);
	my @n503 = grep { ($_->{status} // 0) == 503 } @req;
	cmp_ok(scalar(@n503), '>=', 1, 'the mock answered 503 at least once');
	my %acc;
	$acc{ $_->{conversion}{conversion_id} }++ for $mock->accepted($mark);
	is(join(',', map { $acc{"retry-$_"} // 0 } 1 .. 5), '1,1,1,1,1',
		'each retried conversion accepted exactly once');
	note sprintf('%d requests during the 503 phase (%d answered 503)',
		scalar(@req), scalar(@n503));
}

######################################################################
# 7. SIGHUP: a smaller batch size takes effect without a restart.

$node->append_conf('postgresql.conf', "xcapi.batch_size = 100\n");
$node->reload;
ok( wait_until(
		sub { $node->safe_psql('postgres', 'SHOW xcapi.batch_size') eq '100' },
		10, 'new batch size visible'),
	'xcapi.batch_size reloaded');
sleep 1;    # give the worker time to process the SIGHUP too (setup only)
$mark = $mock->mark;
fire_and_wait(<<'EOS', '250 conversions after the reload');
BEGIN;
SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'hup-' || g,
                        email => 'hup' || g || '@example.com'))
  FROM generate_series(1, 250) g;
COMMIT;
EOS
{
	my @req = $mock->requests($mark);
	is(scalar(@req), 3, '250 conversions in 3 requests with batch_size 100');
	is( join(',', sort { $a <=> $b } map { $_->{n} // 0 } @req),
		'50,100,100', 'batches of 100, 100 and 50');
	is(sent_count("conversion_id LIKE 'hup-%'"), '250', 'all 250 sent');
}

######################################################################
# 8. Every request was signed afresh: no nonce seen twice.

{
	my @oauth = grep { $_->{auth} eq 'oauth' } $mock->requests;
	my %n;
	$n{ $_->{nonce} // '(none)' }++ for @oauth;
	my @dup = grep { $n{$_} > 1 } keys %n;
	ok(!@dup && !$n{'(none)'},
		sprintf('all %d OAuth requests carried distinct nonces', scalar @oauth))
	  or diag "repeated nonces: @dup";
	my @rejected = grep { ($_->{status} // 0) == 401 } $mock->requests;
	is(scalar(@rejected), 0, 'the mock rejected no request as unauthenticated')
	  or diag join("\n", map { $_->{auth_error} // $_->{error} // '' } @rejected);
	my @bad = grep { ($_->{status} // 0) == 400 } $mock->requests;
	is(scalar(@bad), 0, 'the mock found no invalid body')
	  or diag join("\n", map { $_->{error} // '' } @bad);
}

######################################################################
# 9. The worker is killed: the postmaster starts a new one, delivery goes on.

{
	my $old = worker_pid($node);
	like($old, qr/^[0-9]+$/, "worker pid $old");
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
	my $new;
	ok( wait_until(
			sub {
				$new = worker_pid($node);
				$new =~ /^[0-9]+$/ && $new ne $old;
			},
			60,
			'a new worker after pg_terminate_backend'),
		'a new worker replaced the terminated one');
	note "worker $old terminated, new worker " . ($new // 'none');
	$mark = $mock->mark;
	fire_and_wait(<<'EOS', 'a conversion after the worker restart');
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'after-restart',
                  email => 'restart@example.com');
EOS
	is(sent_count("conversion_id = 'after-restart'"), '1',
		'delivery continues after the restart');
	is(scalar(grep { ($_->{conversion}{conversion_id} // '') eq 'after-restart' }
			$mock->accepted($mark)),
		1, 'the mock got it once');
}

######################################################################
# 9b. A conversion too large to stay in its row: its payload is stored out
#     of line (TOAST) in the intake, and filing it into xcapi_conversions
#     must carry the value itself, not a pointer into the intake's storage.

{
	my $mark = $mock->mark;
	my $before = $node->safe_psql('postgres', <<'EOS');
BEGIN;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'large-1',
                  email => 'large@example.com',
                  contents => (SELECT jsonb_agg(jsonb_build_object(
                                   'content_id', 'sku-' || i,
                                   'content_name', (SELECT string_agg(md5(i || '-' || j), '')
                                                      FROM generate_series(1, 30) j)))
                                 FROM generate_series(1, 8) i)) > 0;
SELECT tableoid::regclass || ' ' || pg_column_size(payload) || ' ' || md5(payload::text)
  FROM xcapi_conversions WHERE conversion_id = 'large-1';
SELECT format('SELECT count(*) FROM %s', reltoastrelid::regclass)
  FROM pg_class WHERE oid = 'xcapi_conversions_intake'::regclass \gexec
COMMIT;
EOS
	my (undef, $row, $chunks) = split /\n/, $before;
	my ($table, $stored, $md5) = split / /, $row;
	is($table, 'xcapi_conversions_intake', 'the large conversion is queued in the intake');
	cmp_ok($stored, '>', 2000, "its payload is large ($stored bytes stored)");
	cmp_ok($chunks, '>', 0, "stored out of line: $chunks chunks in the intake's TOAST table");
	is($node->safe_psql('postgres', "SELECT xcapi_wait('60s')"), 't',
		'the large conversion is sent');
	is( $node->safe_psql('postgres',
			"SELECT tableoid::regclass || ' ' || status || ' ' || md5(payload::text) FROM xcapi_conversions WHERE conversion_id = 'large-1'"),
		"xcapi_conversions sent $md5",
		'filed into xcapi_conversions with the very same payload');
	my @acc = grep { ($_->{conversion}{conversion_id} // '') eq 'large-1' } $mock->accepted($mark);
	is(scalar(@acc), 1, 'X got it once');
	is( scalar(@{ $acc[0]{conversion}{contents} // [] }), 8,
		'with its 8 contents items') if @acc;
	is($node->safe_psql('postgres', 'SELECT count(*) FROM ONLY xcapi_conversions_intake'),
		'0', 'the intake is empty again');
}

######################################################################
# 10. Secrets never reach the server log.

{
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	my @leaked = grep { index($log, $CREDS{$_}) >= 0 }
	  qw(consumer_secret access_token_secret);
	push @leaked, 'pixel_token' if index($log, 'tok-123') >= 0;
	ok(!@leaked, 'no secret in the server log') or diag "leaked: @leaked";
}

is( $node->safe_psql('postgres',
		"SELECT count(*) FROM xcapi_conversions WHERE status <> 'sent'"),
	'0',
	'at the end every row is sent');

note sprintf('001_delivery.pl took %.1f s', time() - $t_start);

on_failure_dump($node, $mock);
$node->stop;
$mock->stop;
done_testing();
