
# Copyright (c) 2026, the xcapi authors
#
# t/003_crash.pl -- nothing is lost when the worker dies mid-send: kill -9
# of the worker followed by an immediate-mode restart of the server, and a
# SIGTERM (pg_terminate_backend), each while 20,000 conversions drain
# through a slowed-down mock of X (t/mock_x.py).  Every conversion_id must
# reach the mock at least once, none may end dead or stay queued/sending,
# and the conversions that were in flight when the worker died (they stay
# 'queued' while in flight) must be sent again by the next worker.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use List::Util qw(max min sum0);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use XcapiTest;

my $t_start = time();
my $n = 20_000;

my $mock = start_mock();
# Pacing off: 40,000 conversions and their resends are the point here, not
# the account budget.  restart_after_crash as in production (the TAP
# framework turns it off): the postmaster answers the killed worker with a
# crash cycle of its own, which the immediate stop then cuts into.
my $node = xcapi_node('crash', $mock, conf => <<'EOC');
restart_after_crash = on
xcapi.retry_base = 50
xcapi.retry_max = 1000
xcapi.rate_limit_events = 0
xcapi.rate_limit_requests = 0
EOC

END { on_failure_dump($node, $mock) if $node; }

sub sql
{
	return $node->safe_psql('postgres', $_[0]);
}

sub fire     { return fire_conversions($node, @_); }
sub pending  { return pending_count($node, $_[0]); }
sub statuses { return status_counts($node, $_[0]); }

# The worker's pid while it is in the middle of a send round: the round
# began 0.15 to 0.6 s ago (its requests have reached the mock, whose
# answers take over a second), once the mock has accepted at least $min
# conversions since $mark.
sub busy_worker
{
	my ($pixel, $mark, $min) = @_;
	my $pid;
	wait_until(
		sub {
			return 0 if $mock->accepted_count($mark) < $min;
			my $row = sql(q{SELECT pid || '|' || extract(epoch FROM clock_timestamp() - query_start) FROM pg_stat_activity WHERE backend_type = 'xcapi worker' AND state = 'active' AND query = 'sending conversions'});
			my ($p, $age) = split /\|/, $row;
			return 0 unless $p && $age >= 0.15 && $age < 0.6;
			$pid = $p;
		},
		120,
		"worker busy sending $pixel") or return undef;
	return $pid;
}

# After a drain: the rows and the mock's record.  $t_stop: when the worker
# was killed; the requests the mock was answering then were in flight, and
# each of their conversions must have been sent again afterwards.
sub check_drained
{
	my ($what, $pixel, $prefix, $mark, $log0, $t_stop) = @_;
	ok(wait_until(sub { pending($pixel) eq '0' }, 150, "$what: drained"),
		"$what: nothing left queued or sending");
	is(statuses($pixel), "sent=$n", "$what: all $n rows sent, none dead");
	my $acc = $mock->accepted_ids($mark, $pixel);
	my @missing = grep { !$acc->{"$prefix$_"} } 1 .. $n;
	is(scalar(@missing), 0, "$what: the mock received every one of the $n conversion_ids")
	  or diag "missing: @missing[0 .. min(9, $#missing)]";
	my $twice = grep { $_ > 1 } values %$acc;

	my @req = $mock->requests_since($mark, $pixel);
	my %nonce;
	$nonce{ $_->{nonce} // '(none)' }++ for @req;
	is(scalar(grep { $nonce{$_} > 1 || $_ eq '(none)' } keys %nonce), 0,
		sprintf('%s: the %d requests carried distinct nonces', $what, scalar @req));

	my @inflight = grep { $_->{t} < $t_stop && $_->{t_done} > $t_stop } @req;
	my %resent;
	$resent{$_}++ for map { @{ $_->{conversion_ids} } }
	  grep { $_->{t} > $t_stop && ($_->{status} // 0) == 200 } @req;
	my @ids = map { @{ $_->{conversion_ids} } } @inflight;
	cmp_ok(scalar(@ids), '>', 0, "$what: conversions were in flight when the worker died");
	my @lost = grep { !$resent{$_} } @ids;
	is(scalar(@lost), 0,
		sprintf('%s: all %d conversions in flight (%d requests) were sent again afterwards',
			$what, scalar(@ids), scalar(@inflight)))
	  or diag "not resent: @lost[0 .. min(9, $#lost)]";

	my @requeued = log_since($node, $log0) =~ /re-queued ([0-9]+) conversions that were in flight/g;
	note sprintf('%s: %d requests (%s); %d conversions received more than once; re-queue log lines: %s',
		$what, scalar(@req),
		join(', ', map { my $s = $_; "$s: " . scalar(grep { ($_->{status} // 'none') eq $s } @req) }
			sort { $a cmp $b } keys %{ { map { (($_->{status} // 'none') => 1) } @req } }),
		$twice, join(' + ', @requeued) || 'none');
	note "$what: attempts histogram: "
	  . sql("SELECT string_agg(attempts || ':' || c, ' ' ORDER BY attempts) FROM (SELECT attempts, count(*) c FROM xcapi_conversions WHERE pixel_id = '$pixel' GROUP BY attempts) s");
}

# A slower X: every answer takes 1 s, so 20,000 conversions (40 requests,
# 4 at a time) take 10 s or more to drain.
$mock->set_faults({ delay_ms => 1000 });

######################################################################
# kill -9 of the worker, then an immediate-mode restart.

{
	my $pixel = 'crash9';
	my $mark = $mock->quick_mark;
	my $log0 = -s $node->logfile;
	my $t0 = time();
	is(fire($pixel, 'k-', $n), $n, "kill -9: $n conversions queued");
	note sprintf('kill -9: queued in %.1f s', time() - $t0);
	my $pid = busy_worker($pixel, $mark, 5000);
	ok($pid, 'kill -9: the worker is sending');
	my $got = $mock->accepted_count($mark);
	my $t_kill = time();
	kill 'KILL', $pid if $pid;
	# Restart as soon as the postmaster has seen the death (it then starts
	# its own crash cycle; the immediate stop cuts into that).
	ok( wait_until(
			sub {
				log_since($node, $log0) =~ /background worker "xcapi worker" \(PID $pid\) was terminated by signal 9/;
			},
			30,
			'postmaster notices the killed worker'),
		'kill -9: the postmaster saw the worker killed');
	$node->stop('immediate');
	note sprintf('kill -9: killed worker %s %.1f s after the commit, with %d conversions received',
		$pid // '?', $t_kill - $t0, $got);
	cmp_ok($got, '<', $n, 'kill -9: the worker died mid-drain');
	$node->start;
	check_drained('kill -9', $pixel, 'k-', $mark, $log0, $t_kill);
	note sprintf('kill -9: %.1f s from commit to drained', time() - $t0);
}

######################################################################
# SIGTERM (pg_terminate_backend) mid-batch.

{
	my $pixel = 'crashterm';
	my $mark = $mock->quick_mark;
	my $log0 = -s $node->logfile;
	my $t0 = time();
	is(fire($pixel, 's-', $n), $n, "SIGTERM: $n conversions queued");
	my $pid = busy_worker($pixel, $mark, 2000);
	ok($pid, 'SIGTERM: the worker is sending');
	my $got = $mock->accepted_count($mark);
	my $t_term = time();
	is(sql("SELECT pg_terminate_backend($pid)"), 't', 'SIGTERM: pg_terminate_backend');
	note sprintf('SIGTERM: terminated worker %s %.1f s after the commit, with %d conversions received',
		$pid, $t_term - $t0, $got);
	cmp_ok($got, '<', $n, 'SIGTERM: the worker was stopped mid-drain');
	my $new;
	ok( wait_until(
			sub {
				$new = worker_pid($node);
				$new =~ /^[0-9]+$/ && $new ne $pid;
			},
			60,
			'a new worker after SIGTERM'),
		'SIGTERM: a new worker took over');
	check_drained('SIGTERM', $pixel, 's-', $mark, $log0, $t_term);
	like(log_since($node, $log0), qr/terminating background worker "xcapi worker" due to administrator command/,
		'SIGTERM: the worker stopped on the administrator command');
	note sprintf('SIGTERM: %.1f s from commit to drained', time() - $t0);
}

$mock->set_faults(undef);

{
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	my @leaked = grep { index($log, $CREDS{$_}) >= 0 } qw(consumer_secret access_token_secret);
	ok(!@leaked, 'no secret in the server log') or diag "leaked: @leaked";
	is(scalar(grep { ($_->{auth_error} // '') eq 'nonce reused' } $mock->requests_since({})),
		0, 'the mock saw no replayed nonce');
}

note sprintf('003_crash.pl took %.1f s', time() - $t_start);

on_failure_dump($node, $mock);
$node->stop;
$mock->stop;
done_testing();
