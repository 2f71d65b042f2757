
# Copyright (c) 2026, the xcapi authors
#
# t/005_tls.pl -- transport safety: an untrusted certificate keeps rows
# queued (never sent unverified) until xcapi.ca_file trusts it; plain HTTP
# to a non-loopback host is refused before any request; a refused
# connection is retried with growing, jittered delays.  Last, a loopback
# HTTP proxy (http_proxy in the server's environment, so no name is ever
# resolved) shows whether a plain-HTTP URL whose host merely starts like a
# loopback name would get the credentials.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use XcapiTest;

my $t_start = time();

my $mock = start_mock();
my $node = xcapi_node('tls', $mock, conf => <<'EOC');
# no CA for the mock's self-signed certificate
xcapi.ca_file = ''
xcapi.retry_base = 200
xcapi.retry_max = 1600
xcapi.max_attempts = 1000
EOC

END { on_failure_dump($node, $mock) if $node; }

sub sql { return $node->safe_psql('postgres', $_[0]); }



sub status_of
{
	my ($like) = @_;
	return sql("SELECT string_agg(status || ':' || count, ',' ORDER BY status) FROM (SELECT status, count(*) FROM xcapi_conversions WHERE conversion_id LIKE '$like' GROUP BY status) s");
}

sub fire_n
{
	my ($tag, $n) = @_;
	sql("SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => '$tag-' || g, email => '$tag' || g || '\@example.com')) FROM generate_series(1, $n) g");
}

# Change settings and reload.  The worker handles its SIGHUP at the top of
# its next loop, within milliseconds of the signal; the pause is set-up,
# not an assertion (there is nothing to observe when a reload succeeds).
sub reconfigure
{
	my ($conf) = @_;
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	sleep 1;
}

sub worker_requests { return sql('SELECT requests FROM xcapi_worker_state()'); }

ok(wait_until(sub { worker_pid($node) =~ /^[0-9]+$/ }, 30, 'worker up'), 'the worker runs');

######################################################################
# 1. No xcapi.ca_file: the mock's self-signed certificate is not trusted.
#    Rows stay queued and are retried; nothing reaches the mock.

my $mark = $mock->mark;
my $mock_log_off = -s $mock->{log};
fire_n('tls', 20);
ok( until_sql($node,
		"SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'tls-%' AND status = 'queued' AND attempts >= 2 AND last_error LIKE '%SSL certificate problem%'",
		'20', 30, 'rows retried after a certificate failure'),
	'untrusted certificate: all 20 rows queued, retried (attempts >= 2), last_error "SSL certificate problem"');
note 'last_error: ' . sql("SELECT string_agg(DISTINCT last_error, ' | ') FROM xcapi_conversions WHERE conversion_id LIKE 'tls-%'");
note 'attempts so far: ' . sql("SELECT min(attempts) || '..' || max(attempts) FROM xcapi_conversions WHERE conversion_id LIKE 'tls-%'");
is(sql("SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'tls-%' AND (status IN ('sent', 'dead') OR last_http_status IS NOT NULL)"),
	'0', 'none sent, none dead, no HTTP status (no HTTP exchange happened)');
is(scalar(my @r = $mock->requests($mark)), 0, 'the mock received no request');
{
	my $n = 0;
	wait_until(
		sub {
			my $ml = substr(PostgreSQL::Test::Utils::slurp_file($mock->{log}), $mock_log_off);
			$n = () = $ml =~ /TLS handshake with [^\n]* failed/g;
			$n >= 2;
		},
		10, 'the mock logs failed handshakes');
	cmp_ok($n, '>=', 2, "the mock saw $n TLS handshakes fail (the client aborted each)");
}

my $t_ca = time();
reconfigure("xcapi.ca_file = '$mock->{ca}'\n");
ok( until_sql($node, "SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'tls-%' AND status = 'sent'", '20', 30, 'sent after ca_file'),
	'xcapi.ca_file set and reloaded: all 20 sent');
note sprintf('sent %.1f s after setting xcapi.ca_file', time() - $t_ca);
{
	my %acc;
	$acc{ $_->{conversion}{conversion_id} }++ for $mock->accepted($mark);
	is(join(',', map { $acc{"tls-$_"} // 0 } 1 .. 20), join(',', (1) x 20), 'each accepted exactly once: nothing lost, nothing doubled');
}

######################################################################
# 2. Plain HTTP to a non-loopback host: refused before any request (the
#    .invalid name is never looked up).

$mark = $mock->mark;
my $req0 = worker_requests();
my $off = -s $node->logfile;
reconfigure("xcapi.api_url = 'http://ads-api.example.invalid'\n");
fire_n('plain', 5);
ok( until_sql($node,
		"SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'plain-%' AND status = 'queued' AND attempts = 0 AND last_http_status IS NULL AND last_error = 'no usable credentials: xcapi.api_url is plain HTTP to a non-loopback host'",
		'5', 30, 'plain http refused'),
	'http://ads-api.example.invalid: rows stay queued, attempt not counted, last_error says why');
ok(until_sql($node, "SELECT pause_reason FROM xcapi_pixel_state() WHERE pixel_id = 'o8z6j'", 'xcapi.api_url is plain HTTP to a non-loopback host', 10, 'pixel state published'),
	'xcapi_pixel_state: the pause names the plain-HTTP URL');
{
	my ($w) = log_since($node, $off) =~ /(WARNING:  xcapi: cannot send conversions of pixel "o8z6j": [^\n]*)/;
	like($w // '', qr/refusing to send credentials over plain HTTP to a non-loopback host; set xcapi\.api_url to an https:\/\/ URL/,
		'a WARNING explains the refusal') and note "log: $w";
}
is(worker_requests(), $req0, "no request attempted (xcapi_worker_state().requests still $req0)");
is(scalar(my @r2 = $mock->requests($mark)), 0, 'the mock received nothing');

my $t_reload = time();
reconfigure("xcapi.api_url = '$mock->{url}'\n");
ok(until_sql($node, "SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'plain-%' AND status = 'sent'", '5', 30, 'sent after https again'),
	'api_url back to https and reloaded: the 5 held rows are sent');
{
	my $dt = time() - $t_reload;
	cmp_ok($dt, '<', 5, sprintf('they went out %.1f s after the reload: at once, not after xcapi.naptime (10 s)', $dt));
}

######################################################################
# 3. A closed local port: connection refused, retried with exponential
#    backoff and full jitter (ceiling 200 ms doubling up to 1600 ms).

my $closed = PostgreSQL::Test::Cluster::get_free_port();
$mark = $mock->mark;
reconfigure("xcapi.api_url = 'https://127.0.0.1:$closed'\n");
my $t0 = time();
fire_n('refused', 3);
my (@obs, %seen, $done);
my $deadline = time() + 40;
while (time() < $deadline)
{
	my $rows = sql("SELECT conversion_id, status, attempts, round(extract(epoch FROM next_attempt_at - last_attempt_at) * 1000), coalesce(last_error, '') FROM xcapi_conversions WHERE conversion_id LIKE 'refused-%' AND last_attempt_at IS NOT NULL");
	for (split /\n/, $rows)
	{
		my ($id, $st, $att, $delay, $err) = split /\|/, $_, 5;
		next unless $st eq 'queued' && $err ne '';
		next if $seen{"$id/$att"}++;
		push @obs, { id => $id, attempts => $att, delay => $delay, error => $err };
	}
	last if sql("SELECT min(attempts) FROM xcapi_conversions WHERE conversion_id LIKE 'refused-%'") >= 8;
	usleep(20_000);
}
my $elapsed = time() - $t0;
is(sql("SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'refused-%' AND attempts >= 8 AND status IN ('queued', 'sending')"),
	'3', sprintf('connection refused: 3 rows retried to 8 attempts in %.1f s, still queued', $elapsed));
is(sql("SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'refused-%' AND status IN ('sent', 'dead')"), '0', 'none sent, none dead');
{
	my %errs = map { $_->{error} => 1 } @obs;
	my @e = sort keys %errs;
	ok(@e && !grep({ !/^request failed: .*(Failed to connect|Couldn't connect|Connection refused)/ } @e),
		'last_error carries the curl error') or diag "errors: @e";
	note "last_error: $e[0]" if @e;

	my $ceiling = sub { my $n = shift; my $c = 200 * 2**($n - 1); return $c > 1600 ? 1600 : $c; };
	my @over = grep { $_->{delay} > $ceiling->($_->{attempts}) + 250 } @obs;
	ok(@obs >= 9 && !@over, sprintf('%d observed delays, each within its ceiling min(200 ms * 2^(attempt-1), 1600 ms)', scalar @obs))
	  or diag explain \@over;
	my @late = grep { $_->{attempts} >= 4 && $_->{delay} > 200 } @obs;
	ok(@late, sprintf('the delay grows past xcapi.retry_base: %d delays over 200 ms from the 4th attempt on', scalar @late));
	my %by;
	push @{ $by{ $_->{attempts} } }, $_->{delay} for @obs;
	note 'delay (ms) after attempt n: ' . join('; ', map { "$_: " . join(',', @{ $by{$_} }) } sort { $a <=> $b } keys %by);
	ok($elapsed > 0.5, sprintf('8 attempts took %.1f s, not a tight loop', $elapsed));
}
is(scalar(my @r3 = $mock->requests($mark)), 0, 'the mock received nothing meanwhile');

reconfigure("xcapi.api_url = '$mock->{url}'\n");
ok(until_sql($node, "SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'refused-%' AND status = 'sent'", '3', 30, 'sent after the port is fixed'),
	'api_url fixed: the retried rows are sent (after their backoff)');
{
	my %acc;
	$acc{ $_->{conversion}{conversion_id} }++ for $mock->accepted($mark);
	is(join(',', map { $acc{"refused-$_"} // 0 } 1 .. 3), '1,1,1', 'each accepted exactly once');
}
is(sql("SELECT count(*) FROM xcapi_conversions WHERE status <> 'sent'"), '0', 'at the end of this node every row is sent');
on_failure_dump($node, $mock);
$node->stop;

######################################################################
# 4. Hosts that only look like loopback.  The server runs with http_proxy
#    pointing at a loopback listener: libcurl then hands any http:// request
#    to it without resolving the host, so nothing leaves the machine, and
#    the listener sees what xcapi would have sent in clear.

my $pdir = "$PostgreSQL::Test::Utils::tmp_check/proxy_005";
mkdir $pdir;
unlink "$pdir/port", "$pdir/seen.jsonl";
my $proxy_py = <<'EOP';
import http.server, json, os, sys
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        rec = {"url": self.path, "authorization": "Authorization" in self.headers,
               "pixel_token": "X-Pixel-Token" in self.headers}
        with open(os.path.join(d, "seen.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        body = b'{"errors":[{"code":"SERVICE_UNAVAILABLE","message":"proxy probe"}]}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
with open(os.path.join(d, "port.tmp"), "w") as f:
    f.write(str(s.server_address[1]))
os.rename(os.path.join(d, "port.tmp"), os.path.join(d, "port"))
s.serve_forever()
EOP
my $proxy = IPC::Run::start([ $ENV{XCAPI_PYTHON} // '/usr/bin/python3', '-c', $proxy_py, $pdir ],
	'<', \undef, '>', "$pdir/log", '2>', "$pdir/log");
END { $proxy->kill_kill if $proxy && $proxy->pumpable; }
wait_until(sub { -s "$pdir/port" }, 20, 'proxy listening') or BAIL_OUT('proxy probe did not start');
chomp(my $pport = PostgreSQL::Test::Utils::slurp_file("$pdir/port"));
note "loopback proxy probe on 127.0.0.1:$pport";

sub proxy_seen
{
	return () unless -e "$pdir/seen.jsonl";
	return map { JSON::PP->new->decode($_) } grep { /\S/ } split /\n/, PostgreSQL::Test::Utils::slurp_file("$pdir/seen.jsonl");
}

$node = PostgreSQL::Test::Cluster->new('proxied');
$node->init;
my $pcreds = write_credentials($node->basedir . '/xcapi_credentials');
$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'xcapi'
xcapi.database = 'postgres'
xcapi.api_url = 'http://ads-api.example.invalid'
xcapi.credentials_file = '$pcreds'
xcapi.retry_base = 200
xcapi.max_attempts = 1000
EOC
{
	local $ENV{http_proxy} = "http://127.0.0.1:$pport";
	delete local $ENV{no_proxy};
	delete local $ENV{NO_PROXY};
	$node->start;
}
$node->safe_psql('postgres', 'CREATE EXTENSION xcapi');

my $i = 0;
# (In a URL, "user:password@" before the host is user information: the host
# of http://localhost:1@ads-api.example.invalid is ads-api.example.invalid.)
for my $url (
	'http://localhost.example.invalid',
	'http://127.0.0.1.example.invalid',
	'http://localhost@ads-api.example.invalid',
	'http://localhost:1@ads-api.example.invalid',
	'http://127.0.0.1:1@ads-api.example.invalid',
	'http://[::1]@ads-api.example.invalid')
{
	$i++;
	my $n_before = () = proxy_seen();
	reconfigure("xcapi.api_url = '$url'\n");
	sql("SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'look-$i', email => 'look$i\@example.com')");
	ok(until_sql($node, "SELECT last_error IS NOT NULL FROM xcapi_conversions WHERE conversion_id = 'look-$i'", 't', 30, "look-$i handled"),
		"$url: the worker dealt with the row");
	my @seen = proxy_seen();
	my @new = @seen[ $n_before .. $#seen ];
	my $err = sql("SELECT last_error FROM xcapi_conversions WHERE conversion_id = 'look-$i'");
	# the first row of a pause gets the refusal itself, rows arriving during
	# the pause are held back with the pause's reason: both name the cause
	like($err, qr/xcapi\.api_url is plain HTTP to a non-loopback host$/, "$url: refused as plain HTTP to a non-loopback host");
	ok(!@new, "$url: nothing sent in clear")
	  or diag sprintf('%d requests reached the (loopback) proxy, e.g. %s', scalar @new, JSON::PP->new->canonical->encode($new[0]));
}

# Control: a real loopback http:// URL is allowed, and it is attempted
# directly: cleartext never goes through a proxy, so the probe sees nothing
# (and nothing listens on port 9: a connection error).
{
	my $n_before = () = proxy_seen();
	reconfigure("xcapi.api_url = 'http://127.0.0.1:9'\n");
	sql("SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'control', email => 'control\@example.com')");
	ok(until_sql($node, "SELECT last_error LIKE 'request failed:%' FROM xcapi_conversions WHERE conversion_id = 'control'", 't', 30, 'control attempted'),
		'control: http://127.0.0.1:9 is allowed and attempted');
	my @seen = proxy_seen();
	is(scalar(@seen) - $n_before, 0, 'control: cleartext did not go through the proxy');
}

note sprintf('005_tls.pl took %.1f s', time() - $t_start);

on_failure_dump($node, undef);
$node->stop;
$proxy->kill_kill;
$mock->stop;
done_testing();
