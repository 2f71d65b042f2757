
# Copyright (c) 2026, the xcapi authors
#
# t/006_failover.pl -- primary only: conversions committed on a primary
# that cannot send them (its credentials file is empty) replicate to a
# streaming standby, where no worker runs and nothing is sent; the primary
# dies, the standby is promoted, its worker starts and delivers every one:
# those the old primary's worker held for lack of credentials, and those it
# never tried (committed while it held the pixel).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use XcapiTest;

my $t_start = time();
my $N = 1000;    # held by the old primary's worker
my $M = 200;     # committed while it held the pixel: never tried

my $mock = start_mock();

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
# an empty credentials file (mode 0600): no usable credentials on the primary
my $empty = $primary->basedir . '/xcapi_credentials_empty';
{
	my $old = umask(077);
	open my $fh, '>', $empty or die "could not write $empty: $!";
	print $fh "# nothing here: this server must not send\n";
	close $fh;
	umask($old);
}
$primary->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'xcapi'
xcapi.database = 'postgres'
xcapi.api_url = '$mock->{url}'
xcapi.ca_file = '$mock->{ca}'
xcapi.credentials_file = '$empty'
log_min_messages = info
log_statement = 'none'
EOC
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION xcapi');

my $standby;
END { on_failure_dump($standby // $primary, $mock) if $primary; }

ok(wait_until(sub { worker_pid($primary) =~ /^[0-9]+$/ }, 30, 'primary worker'), 'the primary runs an xcapi worker');

# The standby: a base backup of the primary (with the same xcapi settings),
# streaming, with a valid credentials file of its own.
$primary->backup('bk');
$standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
my $good = write_credentials($standby->basedir . '/xcapi_credentials');
$standby->append_conf('postgresql.conf', "xcapi.credentials_file = '$good'\n");
$standby->start;

sub psql_p { return $primary->safe_psql('postgres', $_[0]); }
sub psql_s { return $standby->safe_psql('postgres', $_[0]); }

######################################################################
# 1. N conversions on the primary, held there for lack of credentials.

my $t_fire = time();
psql_p(<<"EOS");
BEGIN;
SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'fo-' || g,
                        value => g, currency => 'USD',
                        email => 'fo' || g || '\@example.com'))
  FROM generate_series(1, $N) g;
COMMIT;
EOS
note sprintf('%d conversions committed on the primary in %.2f s', $N, time() - $t_fire);
ok( wait_until(
		sub {
			psql_p("SELECT count(*) FROM xcapi_conversions WHERE status = 'queued' AND last_error LIKE '%no usable credentials%'") == $N;
		},
		30,
		'primary holds the rows'),
	"the primary's worker holds all $N rows: \"no usable credentials\"");
note 'on the primary: '
  . psql_p("SELECT string_agg(n || ' rows, next attempt in ' || s || ' s: ' || e, '; ') FROM (SELECT count(*) n, round(extract(epoch FROM min(next_attempt_at) - now())) s, last_error e FROM xcapi_conversions GROUP BY last_error) x");
ok(wait_until(sub { psql_p("SELECT pause_reason FROM xcapi_pixel_state() WHERE pixel_id = 'o8z6j'") eq 'no usable credentials' }, 10, 'pixel paused'),
	'the primary holds pixel o8z6j: "no usable credentials"');
psql_p(<<"EOS");
SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'new-' || g,
                        email => 'new' || g || '\@example.com'))
  FROM generate_series(1, $M) g;
EOS
ok( wait_until(
		sub {
			psql_p("SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'new-%' AND status = 'queued' AND attempts = 0 AND last_error IS NULL AND last_attempt_at IS NULL")
			  == $M;
		},
		10,
		'new rows queued'),
	"$M more committed while the pixel is held: queued, never tried");
# (the worker may defer them to the end of the pixel's pause)
note 'the new rows are due in '
  . psql_p("SELECT round(extract(epoch FROM max(next_attempt_at) - now())) FROM xcapi_conversions WHERE conversion_id LIKE 'new-%'")
  . ' s';

$primary->wait_for_catchup($standby, 'replay', $primary->lsn('insert'));
is(psql_s("SELECT count(*) FROM xcapi_conversions WHERE status = 'queued'"), $N + $M,
	sprintf('the standby has replayed all %d queued conversions', $N + $M));

######################################################################
# 2. On the standby: no worker, nothing sent.

is(psql_s('SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is(psql_s("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'xcapi worker'"), '0',
	'no xcapi worker in pg_stat_activity on the standby');
is(psql_s('SELECT pid IS NULL FROM xcapi_worker_state()'), 't', 'xcapi_worker_state() on the standby: no worker');
is(scalar(my @r = $mock->requests), 0, 'the mock has received nothing (not from the primary, not from the standby)');
is(psql_s("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'xcapi worker'"), '0',
	'still no xcapi worker on the standby');

######################################################################
# 3. The primary dies; the standby is promoted and delivers everything.

$primary->stop('immediate');
my $t_promote = time();
$standby->promote;
ok( wait_until(sub { psql_s('SELECT pg_is_in_recovery()') eq 'f' }, 60, 'promotion'),
	'the standby is promoted');
ok(wait_until(sub { worker_pid($standby) =~ /^[0-9]+$/ }, 30, 'worker on the new primary'),
	'an xcapi worker starts on the promoted standby');
note sprintf('worker up %.1f s after pg_ctl promote', time() - $t_promote);

my $sent = sub {
	my ($like) = @_;
	return psql_s("SELECT count(*) FROM xcapi_conversions WHERE status = 'sent' AND conversion_id LIKE '$like'");
};
ok(wait_until(sub { $sent->('new-%') == $M }, 20, 'never-tried rows'),
	"the $M rows the old primary never tried are delivered within 20 s")
  and note sprintf('%d never-tried rows sent %.1f s after promote', $M, time() - $t_promote);

# The rows the old primary's worker held carry its hold (next_attempt_at up
# to 5 minutes ahead).  The new primary has loaded credentials that work: it
# should not wait for a hold decided by another server without them.
my $all_sent = wait_until(sub { $sent->('fo-%') == $N }, 20, 'held rows after promotion');
ok($all_sent, "the promoted standby delivers the $N rows the old primary held, within 20 s");
note sprintf('all held rows sent %.1f s after promote', time() - $t_promote) if $all_sent;
if (!$all_sent)
{
	diag 'after 20 s: '
	  . psql_s("SELECT string_agg(n || ' ' || st || ', next attempt in ' || coalesce(s::text, '-') || ' s: ' || coalesce(e, '-'), '; ') FROM (SELECT status st, count(*) n, round(extract(epoch FROM min(next_attempt_at) - now())) s, last_error e FROM xcapi_conversions GROUP BY status, last_error) x");
	# A reload on the new primary is the documented way to release held
	# rows.  Go on, so the rest can still be checked.
	$standby->reload;
	my $ok = wait_until(sub { $sent->('fo-%') == $N && $sent->('new-%') == $M }, 15, 'delivery after a reload of the promoted standby');
	diag 'after a reload: '
	  . psql_s("SELECT string_agg(n || ' ' || st || ', next attempt in ' || coalesce(s::text, '-') || ' s: ' || coalesce(e, '-'), '; ') FROM (SELECT status st, count(*) n, round(extract(epoch FROM min(next_attempt_at) - now())) s, last_error e FROM xcapi_conversions GROUP BY status, last_error) x")
	  unless $ok;
}

is(psql_s("SELECT string_agg(status || ':' || n, ',') FROM (SELECT status, count(*) n FROM xcapi_conversions GROUP BY status) s"),
	'sent:' . ($N + $M), 'none queued, none sending, none dead');
{
	my %acc;
	$acc{ $_->{conversion}{conversion_id} }++ for $mock->accepted;
	my @missing = grep { !$acc{$_} } (map { "fo-$_" } 1 .. $N), (map { "new-$_" } 1 .. $M);
	my @dups = grep { $acc{$_} > 1 } keys %acc;
	is(scalar(@missing), 0, sprintf('every one of the %d conversion_ids reached X', $N + $M))
	  or diag "missing e.g. @missing[0 .. ($#missing < 9 ? $#missing : 9)]";
	is(scalar(@dups), 0, 'none twice (the old primary sent nothing)');
	my @req = $mock->requests;
	my $n = 0;
	$n += $_->{n} // 0 for @req;
	ok(@req && !grep({ ($_->{status} // 0) != 200 } @req), sprintf('%d requests, all accepted, %d conversions in all', scalar @req, $n));
}

note sprintf('006_failover.pl took %.1f s', time() - $t_start);

on_failure_dump($standby, $mock);
$standby->stop;
$mock->stop;
done_testing();
