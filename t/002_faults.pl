
# Copyright (c) 2026, the xcapi authors
#
# t/002_faults.pl -- the worker against a misbehaving X (t/mock_x.py with
# fault injection): 503s, dropped connections and hangs over 5,000
# conversions; a 429 window; one poisoned conversion in a batch of 500; a
# reply lost after X accepted the batch; refused credentials; pacing under
# xcapi.rate_limit_events; filing blocked by a user's trigger.  Crashes
# and restarts are in t/003_crash.pl.
#
# Every case uses its own pixel, so the requests and rows of one case are
# easy to tell apart.  Waits are polls with deadlines; sleeps only let time
# pass where the case is about time passing.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use List::Util qw(max min sum0);
use POSIX qw(ceil);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use XcapiTest;

my $t_start = time();

my $mock = start_mock();
my $node = xcapi_node('faults', $mock, conf => <<'EOC');
xcapi.retry_base = 50
xcapi.retry_max = 1000
xcapi.max_attempts = 40
xcapi.request_timeout = 2000
xcapi.connect_timeout = 2000
xcapi.batch_size = 50
EOC

END { on_failure_dump($node, $mock) if $node; }

sub sql
{
	return $node->safe_psql('postgres', $_[0]);
}

# Append settings, reload, and give the worker a moment for its SIGHUP.
sub reload_with
{
	my ($conf) = @_;
	my $before = sql('SELECT pg_conf_load_time()');
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	wait_until(sub { sql('SELECT pg_conf_load_time()') ne $before },
		30, 'configuration reloaded');
	usleep(500_000);
}

sub fire     { return fire_conversions($node, @_); }
sub pending  { return pending_count($node, $_[0]); }
sub statuses { return status_counts($node, $_[0]); }
sub log_offset { return -s $node->logfile; }

sub ids_of
{
	my ($req) = @_;
	return join(',', sort map { $_ // '' } @{ $req->{conversion_ids} || [] });
}

######################################################################
# (a) 30 % 503, 10 % dropped connections, 5 % hangs past the request
#     timeout, over 5,000 conversions in batches of 50.

{
	my $pixel = 'chaos1';
	my $n = 5000;
	my $hang = 5;
	$mock->set_faults({
		status_rate  => { 503 => 0.3 },
		drop_rate    => 0.1,
		hang_rate    => 0.05,
		hang_seconds => $hang });
	my $mark = $mock->quick_mark;
	my $t0 = time();
	is(fire($pixel, 'a-', $n), $n, "(a) $n conversions queued");
	ok(wait_until(sub { pending($pixel) eq '0' }, 170, '(a) chaos drained'),
		'(a) nothing left queued or sending');
	my $t_drained = time();
	$mock->set_faults(undef);
	is(statuses($pixel), "sent=$n", "(a) all $n rows sent, none dead");

	my $acc = $mock->accepted_ids($mark, $pixel);
	my @missing = grep { !$acc->{"a-$_"} } 1 .. $n;
	is(scalar(@missing), 0, "(a) the mock accepted every one of the $n conversion_ids")
	  or diag "missing: @missing[0 .. min(9, $#missing)]";
	my $dups = grep { $_ > 1 } values %$acc;

	# A hung request is recorded when the mock gives up on it, $hang s
	# after it began: let those land before reading the request log.
	usleep(1_000_000 * max(0, $t_drained + $hang + 1 - time()));

	my @req = $mock->requests_since($mark, $pixel);
	my %by;
	$by{ $_->{fault} // $_->{status} // 'none' }++ for @req;
	note sprintf('(a) drained in %.1f s: %d requests (%s), %d conversions accepted more than once',
		$t_drained - $t0, scalar(@req),
		join(', ', map { "$_: $by{$_}" } sort keys %by), $dups);
	cmp_ok($by{status} // 0, '>', 0, '(a) the mock answered 503 at least once');
	cmp_ok($by{drop} // 0, '>', 0, '(a) the mock dropped a connection at least once');
	cmp_ok($by{hang} // 0, '>', 0, '(a) the mock hung at least once');
	is($by{401} // 0, 0, '(a) no request refused as unauthenticated (no replayed nonce)');

	my %nonce;
	$nonce{ $_->{nonce} // '(none)' }++ for @req;
	my @reused = grep { $nonce{$_} > 1 } keys %nonce;
	ok(!@reused && !$nonce{'(none)'},
		sprintf('(a) all %d requests carried distinct nonces', scalar @req))
	  or diag "reused: @reused";

	# Per conversion: requests that carried it, and the failures that must
	# have been counted (503, timeout).  attempts is at least 1 + those and
	# at most the number of requests (a dropped kept-alive connection is
	# resent uncounted).
	my (%nreq, %counted);
	for my $r (@req)
	{
		my $fail = ($r->{fault} // '') eq 'hang'
		  || (($r->{fault} // '') eq 'status' && ($r->{status} // 0) == 503);
		for (@{ $r->{conversion_ids} })
		{
			$nreq{$_}++;
			$counted{$_}++ if $fail;
		}
	}
	my %attempts = map { split /\|/ } split /\n/,
	  sql("SELECT conversion_id || '|' || attempts FROM xcapi_conversions WHERE pixel_id = '$pixel'");
	my (@too_low, @too_high);
	my ($retried, $retried_multi) = (0, 0);
	for my $id (keys %attempts)
	{
		push @too_low, "$id:$attempts{$id}<1+" . ($counted{$id} // 0)
		  if $attempts{$id} < 1 + ($counted{$id} // 0);
		push @too_high, "$id:$attempts{$id}>" . ($nreq{$id} // 0)
		  if $attempts{$id} > ($nreq{$id} // 0);
		if (($counted{$id} // 0) > 0)
		{
			$retried++;
			$retried_multi++ if $attempts{$id} > 1;
		}
	}
	is(scalar(@too_low), 0,
		'(a) attempts >= 1 + the 503s and timeouts each conversion met')
	  or diag "@too_low[0 .. min(9, $#too_low)]";
	# Not asserted: a request that never reached the mock (a connection
	# refused or timed out on a loaded machine) is counted but not seen.
	note sprintf('(a) conversions with more attempts than requests seen by the mock: %d%s',
		scalar(@too_high), @too_high ? " (@too_high[0 .. min(4, $#too_high)])" : '');
	cmp_ok($retried, '>', 0, '(a) some conversions met a 503 or a timeout');
	is($retried_multi, $retried,
		"(a) all $retried conversions retried after a 503 or timeout show attempts > 1");
	my $extra = sum0(map { $attempts{$_} - 1 - ($counted{$_} // 0) } keys %attempts);
	note sprintf('(a) attempts beyond 1 + 503s + timeouts: %d conversion-attempts (%.1f batches of the %d dropped connections were counted)',
		$extra, $extra / 50, $by{drop} // 0);
	note '(a) attempts histogram: '
	  . sql("SELECT string_agg(attempts || ':' || n, ' ' ORDER BY attempts) FROM (SELECT attempts, count(*) n FROM xcapi_conversions WHERE pixel_id = '$pixel' GROUP BY attempts) s");
	note '(a) worker state: '
	  . sql(q{SELECT requests || ' requests, ' || conversions_sent || ' sent, ' || retries || ' retries' FROM xcapi_worker_state()});
}

######################################################################
# (b) X answers 429 until a reset 5-6 s ahead.

# Full batches, and a timeout no loaded machine reaches: from here on
# the only failures are the ones injected.
reload_with("xcapi.batch_size = 500\nxcapi.request_timeout = 10000\n");
{
	my $pixel = 'rl429';
	my $reset = int(time()) + 6;
	my $log0 = log_offset();
	$mock->set_faults({ rate_limit_until => $reset });
	my $mark = $mock->quick_mark;
	fire($pixel, 'b-', 1200);    # 500 + 500 + 200: three requests of one round
	my @r429;
	ok( wait_until(
			sub {
				@r429 = grep { ($_->{status} // 0) == 429 }
				  $mock->requests_since($mark, $pixel);
				scalar @r429;
			},
			max(1, $reset - time()),
			'(b) a first 429'),
		'(b) the mock answered 429');
	my $state = '';
	ok( wait_until(
			sub {
				$state = sql("SELECT pause_reason || '|' || (paused_until >= to_timestamp($reset) AND paused_until < to_timestamp($reset + 1))::int FROM xcapi_pixel_state() WHERE pixel_id = '$pixel'");
				$state eq 'rate-limited by X|1';
			},
			max(1, $reset - time() - 0.2),
			'(b) pixel state during the 429 window'),
		"(b) xcapi_pixel_state() says 'rate-limited by X' until X's reset during the window")
	  or diag "pixel state: $state";
	my $rows = '';
	ok( wait_until(
			sub {
				$rows = sql("SELECT string_agg(k || '/' || n, ' ') FROM (SELECT status || '/' || attempts || '/' || last_http_status k, count(*) n FROM xcapi_conversions WHERE pixel_id = '$pixel' GROUP BY 1) s");
				$rows eq 'queued/0/429/1200';
			},
			max(1, $reset - time() - 0.2),
			'(b) rows held after the 429'),
		'(b) during the window the rows are queued, attempts 0 (not counted), last_http_status 429')
	  or diag "rows: $rows";
	# A commit during the window wakes the worker; the pixel stays held.
	my $fired_second = time();
	fire($pixel, 'b-', 200, 1201);
	note sprintf('(b) second commit %.1f s before the reset', $reset - $fired_second);

	ok(wait_until(sub { pending($pixel) eq '0' }, $reset - time() + 60,
			'(b) delivered after the reset'),
		'(b) everything delivered after the reset');
	$mock->set_faults(undef);
	is(statuses($pixel), 'sent=1400', '(b) all 1,400 sent, none dead');
	is( sql("SELECT count(*) FROM xcapi_conversions WHERE pixel_id = '$pixel' AND attempts <> 1"),
		'0', '(b) every row has attempts = 1: the 429 was not counted');

	# The mock answers 429 to every request before the reset, so the 429s
	# are exactly the requests that came before it: they must be the three
	# of the first round, sent together before any answer was in.
	my @req = $mock->requests_since($mark, $pixel);
	@r429 = grep { ($_->{status} // 0) == 429 } @req;
	my $round_end = max(map { $_->{t_done} } @r429);
	my @early = grep { $_->{t} < $reset && $_->{t} > $round_end } @req;
	is(scalar(@r429), 3, '(b) exactly the three requests of the first round met the 429');
	cmp_ok(max(map { $_->{t} } @r429) - min(map { $_->{t} } @r429), '<', 1,
		'(b) and they went out together');
	is(scalar(@early), 0,
		'(b) after the 429s no request for the pixel reached the mock before the reset')
	  or diag join("\n", map { sprintf('t=%.3f status=%s', $_->{t}, $_->{status} // '-') } @early);
	my @after = grep { $_->{t} > $round_end } @req;
	my $acc = $mock->accepted_ids($mark, $pixel);
	is(scalar(grep { $acc->{"b-$_"} } 1 .. 1400), 1400, '(b) the mock accepted all 1,400');
	note sprintf('(b) 3 x 429 at reset-%.2f s; %d requests after them (sizes %s), the first %.2f s after the reset',
		$reset - $r429[0]{t}, scalar(@after), join(',', map { $_->{n} } @after),
		@after ? $after[0]{t} - $reset : -1);
	cmp_ok(@after ? $after[0]{t} - $reset : 99, '<', 10,
		'(b) and the held rows went out soon after the reset');

	my $log = log_since($node, $log0);
	my @lines = $log =~ /^.*X rate-limited pixel "$pixel".*$/mg;
	is(scalar(@lines), 1, '(b) one LOG line for the 429 window, not one per 429')
	  or diag join("\n", @lines);
	note "(b) $lines[0]" if @lines;
}

######################################################################
# (c) One poisoned conversion in a batch of 500.

{
	my $pixel = 'poison1';
	my $bad = 'c-317';
	$mock->set_faults({ poison_conversion_ids => [$bad] });
	my $mark = $mock->quick_mark;
	fire($pixel, 'c-', 500);
	ok(wait_until(sub { pending($pixel) eq '0' }, 60, '(c) poisoned batch settled'),
		'(c) nothing left queued or sending');
	is(statuses($pixel), 'dead=1 sent=499', '(c) 499 sent, 1 dead');
	is( sql("SELECT conversion_id || '|' || last_http_status FROM xcapi_conversions WHERE pixel_id = '$pixel' AND status = 'dead'"),
		"$bad|400", "(c) the dead one is $bad, with last_http_status 400");
	my $err = sql("SELECT last_error FROM xcapi_conversions WHERE conversion_id = '$bad'");
	like($err, qr/hashed_email \(\Q$bad\E\) is not a valid SHA-256 hash/,
		"(c) its last_error carries X's message");
	note "(c) last_error: $err";

	my $acc = $mock->accepted_ids($mark, $pixel);
	my @ok = grep { $_ ne $bad } map { "c-$_" } 1 .. 500;
	is(scalar(grep { ($acc->{$_} // 0) == 1 } @ok), 499,
		'(c) the mock accepted each of the 499 others exactly once');
	ok(!$acc->{$bad}, '(c) and never the poisoned one');

	my @req = $mock->requests_since($mark, $pixel);
	my $limit = 2 * ceil(log(500) / log(2)) + 1;
	my @n400 = grep { ($_->{status} // 0) == 400 } @req;
	note sprintf('(c) %d requests (%d answered 400), sizes %s', scalar(@req),
		scalar(@n400), join(',', map { $_->{n} // '?' } @req));
	cmp_ok(scalar(@req) - 1, '<=', $limit,
		"(c) extra requests to isolate it <= 2*ceil(log2 500)+1 = $limit");
	is(join(',', @{ $n400[-1]{conversion_ids} || [] }), $bad,
		'(c) the last 400 carried the poisoned conversion alone');

	is(sql("SELECT xcapi_retry(error_like => '%no such error%')"), '0',
		'(c) xcapi_retry with a non-matching error_like re-queues nothing');
	$mock->set_faults(undef);
	$mark = $mock->quick_mark;
	is(sql("SELECT xcapi_retry(error_like => '%is not a valid SHA-256 hash%')"), '1',
		'(c) xcapi_retry(error_like => ...) re-queues the dead one');
	ok( wait_until(
			sub { sql("SELECT status FROM xcapi_conversions WHERE conversion_id = '$bad'") eq 'sent' },
			30, '(c) re-queued conversion sent'),
		'(c) once X accepts it, the re-queued conversion is sent');
	is(($mock->accepted_ids($mark, $pixel)->{$bad} // 0), 1, '(c) the mock accepted it');
	is( sql("SELECT attempts || '|' || last_http_status || '|' || coalesce(last_error, 'null') FROM xcapi_conversions WHERE conversion_id = '$bad'"),
		'1|200|null', '(c) with a fresh attempt budget, status 200 and no error');
}

######################################################################
# (e) X accepts a batch but the reply is lost.

{
	my $pixel = 'dropr1';
	$mock->set_faults({ drop_reply_after_accept_rate => 1.0 });
	my $mark = $mock->quick_mark;
	fire($pixel, 'e-', 20);
	my @dropped;
	ok( wait_until(
			sub {
				@dropped = grep { ($_->{fault} // '') eq 'drop_reply_after_accept' }
				  $mock->requests_since($mark, $pixel);
				scalar @dropped;
			},
			30,
			'(e) a reply dropped after accepting'),
		'(e) the mock accepted a batch and dropped the reply');
	$mock->set_faults(undef);
	ok(wait_until(sub { pending($pixel) eq '0' }, 30, '(e) rows settled'),
		'(e) nothing left queued or sending');
	is(statuses($pixel), 'sent=20', '(e) all 20 rows sent');

	my @req = $mock->requests_since($mark, $pixel);
	my @ok = grep { ($_->{status} // 0) == 200 } @req;
	is(scalar(@ok), 1, '(e) one request answered 200');
	is(ids_of($ok[0] // {}), ids_of($dropped[0]),
		'(e) the resend carried the same conversion_ids');
	ok(defined $ok[0] && ($ok[0]{nonce} // '') ne ($dropped[0]{nonce} // ''),
		'(e) and a different nonce');
	my $acc = $mock->accepted_ids($mark, $pixel);
	is(scalar(grep { ($acc->{"e-$_"} // 0) >= 2 } 1 .. 20), 20,
		'(e) the mock got each conversion twice (X deduplicates by conversion_id)');
	note sprintf('(e) %d requests: %s; attempts %s', scalar(@req),
		join(', ', map { $_->{fault} // $_->{status} // '-' } @req),
		sql("SELECT string_agg(DISTINCT attempts::text, ',') FROM xcapi_conversions WHERE pixel_id = '$pixel'"));
}

######################################################################
# (h) 404: the pixel, event or account is wrong for the whole batch: dead at
#     once with X's message, no split, no retry; xcapi_retry by id re-queues.

{
	my $pixel = 'nf404';
	$mock->set_faults({ force_status => 404 });
	my $mark = $mock->quick_mark;
	fire($pixel, 'h-', 10);
	ok(wait_until(sub { pending($pixel) eq '0' }, 30, '(h) rows settled'),
		'(h) nothing left queued after a 404');
	is(statuses($pixel), 'dead=10', '(h) all 10 rows dead');
	is(sql("SELECT count(*) FROM xcapi_conversions WHERE pixel_id = '$pixel' AND last_http_status = 404 AND attempts = 1 AND last_error = 'HTTP 404: NOT_FOUND: The requested resource could not be found'"),
		'10', '(h) each keeps status 404, X\'s code and message, one attempt');
	my @req = $mock->requests_since($mark, $pixel);
	is(scalar(@req), 1, '(h) one request: a 404 is not split or retried');
	$mock->set_faults(undef);

	my $ids = sql("SELECT array_agg(id ORDER BY id) FROM (SELECT id FROM xcapi_conversions WHERE pixel_id = '$pixel' ORDER BY id LIMIT 3) s");
	is(sql("SELECT xcapi_retry(ids => '$ids')"), '3', '(h) xcapi_retry(ids => ...) re-queues three of them');
	ok(wait_until(sub { statuses($pixel) eq 'dead=7 sent=3' }, 30, '(h) retried rows sent'),
		'(h) the three are sent, the other seven stay dead');
}

######################################################################
# (f) Wrong credentials, then the right ones and a reload.

{
	my $pixel = 'badcr1';
	my $creds = $node->basedir . '/xcapi_credentials';
	my $wrong = 'WrongConsumerSecret0123456789abcdefWrongXYZ';
	{
		local $CREDS{consumer_secret} = $wrong;
		write_credentials($creds);
	}
	reload_with('');
	my $log0 = log_offset();
	my $mark = $mock->quick_mark;
	fire($pixel, 'f-', 1200);    # three requests of one round
	my $state = '';
	ok( wait_until(
			sub {
				$state = sql("SELECT coalesce(pause_reason, '-') FROM xcapi_pixel_state() WHERE pixel_id = '$pixel'");
				$state eq 'credentials rejected';
			},
			30,
			'(f) pixel paused for refused credentials'),
		"(f) xcapi_pixel_state() says 'credentials rejected'")
	  or diag "pixel state: $state";
	my $rows = '';
	ok( wait_until(
			sub {
				$rows = sql("SELECT string_agg(k || '/' || n, ' ') FROM (SELECT status || '/' || attempts || '/' || last_http_status k, count(*) n FROM xcapi_conversions WHERE pixel_id = '$pixel' GROUP BY 1) s");
				$rows eq 'queued/0/401/1200';
			},
			30,
			'(f) rows held'),
		'(f) rows stay queued with attempts 0 (not counted) and last_http_status 401')
	  or diag "rows: $rows";

	# More conversions while paused: no request, no second WARNING.
	my $nreq = scalar $mock->requests_since($mark, $pixel);
	fire($pixel, 'f-', 100, 1201);
	sleep 2;    # time for a (wrong) request to happen
	is(scalar($mock->requests_since($mark, $pixel)), $nreq,
		"(f) a commit during the pause sends nothing ($nreq requests, all 401)");
	is(scalar(grep { ($_->{status} // 0) != 401 } $mock->requests_since($mark, $pixel)), 0,
		'(f) every request so far was refused with 401');

	my $log = log_since($node, $log0);
	my @warn = $log =~ /^.*WARNING:.*$/mg;
	my @ours = grep { /cannot send conversions of pixel "\Q$pixel\E"/ } @warn;
	is(scalar(@ours), 1, '(f) exactly one WARNING naming the pixel')
	  or diag join("\n", @warn);
	note "(f) $ours[0]" if @ours;
	my @leaks = grep { index($log, $_) >= 0 }
	  ($wrong, $CREDS{consumer_secret}, $CREDS{access_token_secret},
		$CREDS{access_token});
	is(scalar(@leaks), 0, '(f) no secret in the log');

	write_credentials($creds);
	my $t_fix = time();
	$node->reload;
	ok(wait_until(sub { pending($pixel) eq '0' }, 60, '(f) delivered after the fix'),
		'(f) after the right credentials and a reload, delivered');
	my $lat = time() - $t_fix;
	note sprintf('(f) delivered %.1f s after the reload', $lat);
	cmp_ok($lat, '<', 20, '(f) promptly, not after the 5-minute pause');
	is(statuses($pixel), 'sent=1300', '(f) all 1,300 rows sent');
	is(sql("SELECT count(*) FROM xcapi_conversions WHERE pixel_id = '$pixel' AND attempts <> 1"),
		'0', '(f) with attempts = 1');
	is( sql("SELECT coalesce(pause_reason, '-') FROM xcapi_pixel_state() WHERE pixel_id = '$pixel'"),
		'-', '(f) and the pixel is no longer paused');
}

######################################################################
# (g) Pacing: 1,000 conversions per 3 s window, 3,000 conversions.

{
	my $pixel = 'pace1';
	my ($budget, $window, $n) = (1000, 3, 3000);
	reload_with("xcapi.rate_limit_events = $budget\nxcapi.rate_window = $window\n");
	# Start with an empty window (every pixel here shares the mock's one
	# ad account), and at 0.2 s past a whole second, so that the first
	# requests are clear of the whole-second boundaries the budget is kept
	# in (the mock's clock sees them a little after the worker counted them).
	my $nreq_all = $mock->quick_mark->{requests};
	my ($last) = $mock->requests_since({ requests => max(0, $nreq_all - 1) });
	usleep(1_000_000 * max(0, ($last ? $last->{t_done} : 0) + $window + 0.5 - time()));
	my $now = time();
	my $frac = $now - int($now);
	usleep(1_000_000 * ($frac <= 0.2 ? 0.2 - $frac : 1.2 - $frac));
	my $log0 = log_offset();
	my $mark = $mock->quick_mark;
	fire($pixel, 'g-', $n);
	my $seen_budget = 0;
	ok( wait_until(
			sub {
				$seen_budget ||= sql("SELECT count(*) FROM xcapi_pixel_state() WHERE pixel_id = '$pixel' AND pause_reason = 'rate budget spent'");
				pending($pixel) eq '0';
			},
			60,
			'(g) paced delivery done'),
		'(g) everything delivered');
	is(statuses($pixel), "sent=$n", "(g) all $n sent");
	ok($seen_budget, "(g) xcapi_pixel_state() showed 'rate budget spent' meanwhile");
	is(sql("SELECT count(*) FROM xcapi_conversions WHERE pixel_id = '$pixel' AND attempts <> 1"),
		'0', '(g) held-back rows were not charged an attempt');

	my @req = $mock->requests_since($mark);
	is(scalar(grep { ($_->{status} // 0) == 429 } @req), 0, '(g) no 429');
	@req = grep { $_->{pixel} eq $pixel } @req;
	is(sum0(map { ($_->{status} // 0) == 200 ? $_->{n} : 0 } @req), $n,
		"(g) $n conversions accepted");

	# Groups of requests (gaps of 1 s or more between them).
	my @groups;
	for my $r (sort { $a->{t} <=> $b->{t} } @req)
	{
		push @groups, { t => $r->{t}, n => 0 }
		  if !@groups || $r->{t} - $groups[-1]{last} >= 1;
		$groups[-1]{n} += $r->{n};
		$groups[-1]{last} = $r->{t};
	}
	my $t_first = $groups[0]{t};
	note '(g) groups (s after the first, conversions): '
	  . join(' ', map { sprintf('%.2f:%d', $_->{t} - $t_first, $_->{n}) } @groups);
	cmp_ok(scalar(@groups), '>=', 3, '(g) sent in at least 3 windows');
	is(scalar(grep { $_->{n} > $budget } @groups), 0,
		"(g) no group larger than $budget");
	cmp_ok($groups[-1]{t} - $t_first, '>=', 2 * $window - 1,
		'(g) the last group went out at least 2 windows (less the 1-s granularity) after the first');

	# Most conversions within one window of length 3 s: windows starting
	# at a whole second (how the budget is kept), and windows starting
	# anywhere (at each request).
	my ($max_aligned, $max_any) = (0, 0);
	for my $r (@req)
	{
		my $sum = sum0(map { $_->{n} } grep { $_->{t} >= $r->{t} && $_->{t} < $r->{t} + $window } @req);
		$max_any = $sum if $sum > $max_any;
	}
	my ($lo, $hi) = (int($t_first) - $window, int($groups[-1]{last}) + 1);
	for my $s ($lo .. $hi)
	{
		my $sum = sum0(map { $_->{n} } grep { $_->{t} >= $s && $_->{t} < $s + $window } @req);
		$max_aligned = $sum if $sum > $max_aligned;
	}
	note "(g) most conversions in a 3-s window: $max_aligned (windows starting at a whole second), $max_any (any start)";
	cmp_ok($max_aligned, '<=', $budget,
		"(g) no 3-s window starting at a whole second holds more than $budget");
	# usage of second s counts until the end of second s + window, so no
	# real-time window of that length holds more than the budget
	cmp_ok($max_any, '<=', $budget, "(g) no 3-s window at all holds more than $budget");
	my @lines = log_since($node, $log0) =~ /^.*used its rate budget.*$/mg;
	note sprintf('(g) %d LOG lines about the budget', scalar @lines);

	reload_with("xcapi.rate_limit_events = 60000\nxcapi.rate_window = 900\n");
}

######################################################################
# (h) Filing blocked: a trigger someone added to xcapi_conversions refuses
#     a new row, so the worker cannot file the intake's rows.  It warns
#     once, stays up (no exit-and-restart loop), leaves the rows queued and
#     visible, and files and sends them all once the trigger is gone.

{
	my $pixel = 'file1';
	my $mark = $mock->mark;
	my $log0 = log_offset();
	my $pid = worker_pid($node);
	sql(q{CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF NEW.conversion_id = 'fp-poison' THEN
		RAISE EXCEPTION 'conversion fp-poison refused by a user trigger';
	END IF;
	RETURN NEW;
END $$});
	sql('CREATE TRIGGER refuse_poison BEFORE INSERT ON xcapi_conversions'
		  . ' FOR EACH ROW EXECUTE FUNCTION refuse_poison()');
	sql("SELECT xcapi_fire('$pixel', 'tw-$pixel-o8z2x', conversion_id => 'fp-poison',"
		  . " email => 'poison\@example.com')");
	ok( wait_until(
			sub { log_since($node, $log0) =~ /could not file new conversions into xcapi_conversions: conversion fp-poison refused by a user trigger/ },
			30, 'the filing WARNING'),
		'(h) the worker says why it cannot file');
	# more commits wake the worker: each wake tries again, in vain; the
	# second lets the attempts happen
	for my $g (1 .. 5)
	{
		is(fire($pixel, 'fp-', 1, $g), '1', "(h) conversion fp-$g queued behind it");
	}
	usleep(1_000_000);
	is( sql("SELECT string_agg(DISTINCT tableoid::regclass || ' ' || status || ' ' || attempts, ',')"
			  . " FROM xcapi_conversions WHERE pixel_id = '$pixel'"),
		'xcapi_conversions_intake queued 0',
		'(h) all 6 rows wait in the intake, queued, visible in xcapi_conversions');
	is(sql("SELECT queued FROM xcapi_stats WHERE pixel_id = '$pixel'"), '6',
		'(h) xcapi_stats counts them as queued');
	is(worker_pid($node), $pid, '(h) the same worker process throughout');
	my @warnings = log_since($node, $log0) =~ /could not file new conversions/g;
	is(scalar(@warnings), 1, '(h) one WARNING, not one per attempt');
	is(scalar(keys %{ $mock->accepted_ids($mark, $pixel) }), 0,
		'(h) nothing of the pixel was sent');

	sql('DROP TRIGGER refuse_poison ON xcapi_conversions');
	is(fire($pixel, 'fp-', 1, 6), '1', '(h) one more conversion wakes the worker');
	ok( until_sql($node,
			"SELECT count(*) FILTER (WHERE status = 'sent') || '/' || count(*) FROM ONLY xcapi_conversions WHERE pixel_id = '$pixel'",
			'7/7', 30, 'filed and sent'),
		'(h) without the trigger all 7 are filed and sent');
	is(sql('SELECT count(*) FROM ONLY xcapi_conversions_intake'), '0', '(h) the intake is empty');
	is(join(',', sort keys %{ $mock->accepted_ids($mark, $pixel) }),
		'fp-1,fp-2,fp-3,fp-4,fp-5,fp-6,fp-poison', '(h) X has all 7');
	is(worker_pid($node), $pid, '(h) still the same worker process');
	sql('DROP FUNCTION refuse_poison()');
}

######################################################################
# Over the whole run.

{
	my @req = $mock->requests_since({});
	my %n;
	$n{ $_->{nonce} }++ for grep { $_->{auth} eq 'oauth' && defined $_->{nonce} } @req;
	my @dup = grep { $n{$_} > 1 } keys %n;
	is(scalar(@dup), 0,
		sprintf('every one of the %d OAuth requests of this file carried its own nonce', scalar keys %n));
	my @replay = grep { ($_->{auth_error} // '') eq 'nonce reused' } @req;
	is(scalar(@replay), 0, 'the mock saw no replayed nonce');
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	my @leaked = grep { index($log, $CREDS{$_}) >= 0 } qw(consumer_secret access_token_secret);
	ok(!@leaked, 'no secret in the server log') or diag "leaked: @leaked";
}

note sprintf('002_faults.pl took %.1f s', time() - $t_start);

on_failure_dump($node, $mock);
$node->stop;
$mock->stop;
done_testing();
