
# Copyright (c) 2026, the xcapi authors
#
# t/008_retention.pl -- queue hygiene: sent conversions older than
# xcapi.retention are purged by the worker in batches; queued and dead ones
# never are; 0 keeps everything.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use XcapiTest;

my $mock = start_mock();
my $node = xcapi_node('retention', $mock, conf => <<'EOC');
xcapi.retention = 0
xcapi.naptime = 1
EOC
END { on_failure_dump($node, $mock) if $node; }

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub counts
{
	return sql("SELECT coalesce(string_agg(status || '=' || n, ' ' ORDER BY status), '') FROM (SELECT status, count(*) n FROM xcapi_conversions GROUP BY status) s");
}

# 25,000 sent (more than one purge batch of 10,000) and one dead row.
sql(q{SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'r' || g,
                              email => 'r' || g || '@example.com'))
        FROM generate_series(1, 25000) g});
is(sql("SELECT xcapi_wait('120s')"), 't', 'the backlog is sent');
sql(q{UPDATE xcapi_conversions SET status = 'dead', next_attempt_at = NULL,
          last_error = 'kept for the operator'
       WHERE conversion_id = 'r1'});

# With retention 0 nothing is purged, however old.
sql(q{UPDATE xcapi_conversions SET sent_at = now() - interval '30 days' WHERE status = 'sent'});
sleep(3);
is(counts(), 'dead=1 sent=24999', 'xcapi.retention = 0 keeps sent rows');

# Retention 7 days: the 30-day-old rows go, in batches, the dead one stays.
$node->append_conf('postgresql.conf', "xcapi.retention = '7d'\n");
$node->reload;
ok(wait_until(sub { counts() eq 'dead=1' }, 60, 'old sent rows purged'),
	'sent rows older than xcapi.retention are purged');
is(counts(), 'dead=1', 'the dead row is kept');

# Fresh sent rows stay until they are old enough.
sql(q{SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'n' || g,
                              email => 'n' || g || '@example.com'))
        FROM generate_series(1, 100) g});
is(sql("SELECT xcapi_wait('60s')"), 't', 'new conversions sent');
sleep(2);
is(counts(), 'dead=1 sent=100', 'recent sent rows are kept');

my $log = slurp_file($node->logfile);
unlike($log, qr/ERROR|FATAL/, 'no error in the server log');

$node->stop;
$mock->stop;
done_testing();
