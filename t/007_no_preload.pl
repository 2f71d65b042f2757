
# Copyright (c) 2026, the xcapi authors
#
# t/007_no_preload.pl -- xcapi installed but not in shared_preload_libraries:
# xcapi_fire still queues, and says once per transaction (a WARNING with a
# hint) that nothing will be sent until the library is preloaded.  Also a
# server that had xcapi preloaded, restarted without it: calls still work.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use XcapiTest;

my $node = PostgreSQL::Test::Cluster->new('nopreload');
$node->init;
$node->append_conf('postgresql.conf', "log_statement = 'none'\n");
$node->start;
END { on_failure_dump($node, undef) if $node; }

is($node->safe_psql('postgres', 'SHOW shared_preload_libraries'), '', 'no shared_preload_libraries');

# Run SQL, return (exit code, stdout, the WARNING lines, the HINT lines).
sub run_sql
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres', $sql, stdout => \$out, stderr => \$err);
	my @w = $err =~ /^(?:psql:[^\n]*?)?WARNING:  ([^\n]*)/mg;
	my @h = $err =~ /^HINT:  ([^\n]*)/mg;
	return ($rc, $out, \@w, \@h, $err);
}

my $warning = 'xcapi is not loaded via shared_preload_libraries, so queued conversions will not be sent';
my $hint = qr/Add xcapi to shared_preload_libraries/;

my ($rc, $out, $w, $h, $err) = run_sql('CREATE EXTENSION xcapi');
is($rc, 0, 'CREATE EXTENSION xcapi succeeds without preloading') or diag $err;
if ($rc != 0)
{
	# Everything below needs the extension: stop here rather than pile up
	# failures that say nothing more.
	diag 'server log: ' . join("\n", grep { /FATAL|ERROR|PANIC/ } split /\n/, PostgreSQL::Test::Utils::slurp_file($node->logfile));
	removed_preload();
	$node->stop;
	done_testing();
	exit 0;
}

($rc, $out, $w, $h, $err) = run_sql(
	"SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-1', email => 'np1\@example.com') > 0");
is($rc, 0, 'xcapi_fire succeeds') or diag $err;
is($out, 't', 'and returns the new id');
is(scalar(@$w), 1, 'one WARNING') or diag $err;
is($w->[0], $warning, 'the WARNING says nothing will be sent');
ok(@$h == 1 && $h->[0] =~ $hint, 'with the hint to add xcapi to shared_preload_libraries') or diag $err;
note "client saw:\n$err";

($rc, $out, $w, $h, $err) = run_sql(
	"SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-ten-' || g, email => 'np' || g || '\@example.com')) FROM generate_series(1, 10) g");
is($out, '10', 'a 10-row statement queues 10');
is(scalar(@$w), 1, 'and gives one WARNING, not ten') or diag $err;

($rc, $out, $w, $h, $err) = run_sql(<<'EOS');
BEGIN;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-tx-1', email => 'tx1@example.com') > 0;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-tx-2', email => 'tx2@example.com') > 0;
COMMIT;
BEGIN;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-tx-3', email => 'tx3@example.com') > 0;
COMMIT;
EOS
is(scalar(@$w), 2, 'two transactions (two statements, then one): one WARNING each') or diag $err;

($rc, $out, $w, $h, $err) = run_sql(<<'EOS');
BEGIN;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-rb', email => 'rb@example.com') > 0;
ROLLBACK;
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'np-after-rb', email => 'arb@example.com') > 0;
EOS
is(scalar(@$w), 2, 'a rolled-back transaction warned, the next one warns again') or diag $err;

is( $node->safe_psql('postgres',
		"SELECT count(*) || ' ' || string_agg(DISTINCT status, ',') FROM xcapi_conversions"),
	'15 queued', 'the 15 committed conversions are queued (the rolled-back one is not)');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'xcapi worker'"),
	'0', 'no worker runs');
{
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	my $n = () = $log =~ /WARNING:  \Q$warning\E/g;
	is($n, 6, 'the server log has the same 6 WARNINGs');
}

removed_preload();
on_failure_dump($node, undef);
$node->stop;
done_testing();

# A server that ran with xcapi preloaded and created the extension, then
# restarted without it: a call loads the library in the session.
sub removed_preload
{
	my $n2 = PostgreSQL::Test::Cluster->new('removed');
	$n2->init;
	$n2->append_conf('postgresql.conf', "shared_preload_libraries = 'xcapi'\nlog_statement = 'none'\n");
	$n2->start;
	$n2->safe_psql('postgres', 'CREATE EXTENSION xcapi');
	$n2->append_conf('postgresql.conf', "shared_preload_libraries = ''\n");
	$n2->restart;
	my ($o, $e) = ('', '');
	my $rc = $n2->psql('postgres',
		"SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'rm-1', email => 'rm\@example.com') > 0",
		stdout => \$o, stderr => \$e);
	is($rc, 0, 'preload removed after CREATE EXTENSION: xcapi_fire still succeeds') or diag $e;
	my @w = $e =~ /WARNING:  ([^\n]*)/g;
	ok(@w == 1 && $w[0] eq $warning, 'with the one WARNING') or diag $e;
	$n2->stop;
}
