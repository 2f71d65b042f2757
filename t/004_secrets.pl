
# Copyright (c) 2026, the xcapi authors
#
# t/004_secrets.pl -- the credentials file: default OAuth values, a pixel
# with its own OAuth set, a pixel with only its own token pair, pixel tokens
# (also for ids starting with a digit), each verified by the mock against
# the right secrets; new secrets on reload without a restart; a group- or
# world-readable file and syntax errors refused with clear WARNINGs that
# echo no value; and no secret, old or new, in the server log (debug1, then
# debug2 with log_statement = all), the queue, pg_settings or any error.

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

# Two generations of secrets.  Every value is distinct and distinctive, so
# finding one anywhere is a leak, not a coincidence.
sub secrets
{
	my ($g) = @_;    # 'OLD' or 'NEW'
	return {
		default => {
			consumer_key        => "ckDef${g}7Qz1Rw",
			consumer_secret     => "csDef${g}secret9Xk2LmVb",
			access_token        => "111-atDef${g}8PqTn",
			access_token_secret => "atsDef${g}secret4Hn7Yc",
		},
		# a pixel with its own complete OAuth set (another app and account)
		k7m2p => {
			consumer_key        => "ckK7${g}3VbQe",
			consumer_secret     => "csK7${g}secret6TrGu",
			access_token        => "222-atK7${g}5WsHi",
			access_token_secret => "atsK7${g}secret2JdKo",
		},
		# a pixel id starting with a digit, only its own token pair (the
		# consumer key and secret are the defaults)
		'1a2b3' => {
			access_token        => "333-at1a${g}9GcLp",
			access_token_secret => "ats1a${g}secret8FyMa",
		},
		pixel_tokens => {
			p0tok   => "tokP0${g}secret3MxNs",
			'9q8r7' => "tok9q${g}secret1ZwDf",
		},
	};
}
my %S = (OLD => secrets('OLD'), NEW => secrets('NEW'));

# Every secret value of one generation (keys and tokens too).
sub values_of
{
	my ($s) = @_;
	my @v;
	for my $set (qw(default k7m2p 1a2b3))
	{
		push @v, values %{ $s->{$set} };
	}
	push @v, values %{ $s->{pixel_tokens} };
	return @v;
}
my @ALL_SECRETS = (values_of($S{OLD}), values_of($S{NEW}));

# The mock's view of one generation.
sub mock_opts
{
	my ($s) = @_;
	my $d = $s->{default};
	return (
		creds => { %$d, pixel_tokens => $s->{pixel_tokens} },
		oauth_sets => {
			k7m2p => [
				@{ $s->{k7m2p} }{
					qw(consumer_key consumer_secret access_token access_token_secret)
				}
			],
			'1a2b3' => [
				$d->{consumer_key}, $d->{consumer_secret},
				@{ $s->{'1a2b3'} }{qw(access_token access_token_secret)}
			],
		});
}

# The credentials file text for one generation.
sub creds_text
{
	my ($s) = @_;
	my $d = $s->{default};
	my $t = "# xcapi credentials (004_secrets.pl)\n\n# defaults\n";
	$t .= "$_ = '$d->{$_}'\n"
	  for qw(consumer_key consumer_secret access_token access_token_secret);
	$t .= "\n# k7m2p: its own app and account\n";
	$t .= "k7m2p.$_ = '$s->{k7m2p}{$_}'\n"
	  for qw(consumer_key consumer_secret access_token access_token_secret);
	$t .= "\n# 1a2b3: another account, same app\n";
	$t .= "1a2b3.$_ = '$s->{'1a2b3'}{$_}'\n"
	  for qw(access_token access_token_secret);
	$t .= "\n# pixel tokens\n";
	$t .= "$_.pixel_token = '$s->{pixel_tokens}{$_}'\n"
	  for sort keys %{ $s->{pixel_tokens} };
	return $t;
}

sub write_file_mode
{
	my ($path, $text, $mode) = @_;
	my $tmp = "$path.tmp";
	my $old = umask(077);
	open my $fh, '>', $tmp or die "could not write $tmp: $!";
	print $fh $text;
	close $fh;
	umask($old);
	chmod $mode // 0600, $tmp;
	rename $tmp, $path or die "could not rename $tmp: $!";
}

# pixel => expected scheme and mock credential set
my %PIXELS = (
	o8z6j   => [ 'oauth',       'default' ],
	k7m2p   => [ 'oauth',       'k7m2p' ],
	'1a2b3' => [ 'oauth',       '1a2b3' ],
	p0tok   => [ 'pixel_token', undef ],
	'9q8r7' => [ 'pixel_token', undef ],
);
my @PIXELS = sort keys %PIXELS;

my $mock = start_mock(mock_opts($S{OLD}));

my $node = PostgreSQL::Test::Cluster->new('secrets');
$node->init;
my $creds = $node->basedir . '/xcapi_credentials';
write_file_mode($creds, creds_text($S{OLD}));
$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'xcapi'
xcapi.database = 'postgres'
xcapi.api_url = '$mock->{url}'
xcapi.ca_file = '$mock->{ca}'
xcapi.credentials_file = '$creds'
xcapi.retry_base = 100
log_min_messages = debug1
log_statement = 'none'
EOC
$node->start;
$node->safe_psql('postgres', <<'EOS');
CREATE EXTENSION xcapi;
CREATE ROLE analyst LOGIN;
EOS

END { on_failure_dump($node, $mock) if $node; }

my $analyst_connstr = $node->connstr('postgres') . ' user=analyst';
my @error_texts;    # every error message collected, scanned at the end

sub sql { return $node->safe_psql('postgres', $_[0]); }



sub wait_log
{
	my ($re, $off, $timeout, $what) = @_;
	my $m;
	wait_until(sub { ($m) = log_since($node, $off) =~ /($re)/; defined $m }, $timeout, $what);
	return $m;
}

# Rows held for their credentials go out "at once after a reload" (README),
# not at the worker's next safety-net wake-up (xcapi.naptime, 10 s here).
sub at_once
{
	my ($t_reload, $what) = @_;
	my $dt = time() - $t_reload;
	cmp_ok($dt, '<', 5, sprintf('%s went out %.1f s after the reload: at once, not after xcapi.naptime (10 s)', $what, $dt));
}

# One conversion per pixel, ids "<tag>-<pixel>-<n>".
sub fire_each
{
	my ($tag, $n) = @_;
	$n //= 1;
	my $sql = "BEGIN;\n";
	for my $p (@PIXELS)
	{
		$sql .= "SELECT count(xcapi_fire('$p', 'tw-$p-abc12', conversion_id => '$tag-$p-' || g, email => 'u' || g || '\@example.com')) FROM generate_series(1, $n) g;\n";
	}
	$sql .= "COMMIT;\n";
	sql($sql);
}

sub status_of
{
	my ($tag) = @_;
	return sql("SELECT string_agg(status || ':' || count, ',' ORDER BY status) FROM (SELECT status, count(*) FROM xcapi_conversions WHERE conversion_id LIKE '$tag-%' GROUP BY status) s");
}

# Requests since $mark per pixel: "auth/oauth_set/status ...".
sub requests_by_pixel
{
	my ($mark) = @_;
	my %r;
	for my $q ($mock->requests($mark))
	{
		push @{ $r{ $q->{pixel} } }, join('/', $q->{auth}, $q->{oauth_set} // '-', $q->{status} // 'none');
	}
	return \%r;
}

sub check_schemes
{
	my ($mark, $what) = @_;
	my $r = requests_by_pixel($mark);
	for my $p (@PIXELS)
	{
		my ($auth, $set) = @{ $PIXELS{$p} };
		my @got = @{ $r->{$p} || [] };
		ok(@got && !grep({ $_ ne join('/', $auth, $set // '-', 200) } @got),
			"$what: pixel $p sent with $auth" . ($set ? " signed with the $set set" : '') . ', accepted')
		  or diag "requests for $p: @got";
	}
}

######################################################################
# 1. Every scheme, verified by the mock against the right secrets.

ok(wait_until(sub { worker_pid($node) =~ /^[0-9]+$/ }, 30, 'worker up'), 'the worker runs');
my $worker = worker_pid($node);

my $mark = $mock->mark;
fire_each('first', 3);
is(sql("SELECT xcapi_wait('60s')"), 't', 'first round: xcapi_wait returns true');
is(status_of('first'), 'sent:15', 'first round: all 15 conversions (3 per pixel) sent');
check_schemes($mark, 'first round');
{
	my %acc;
	$acc{ $_->{conversion}{conversion_id} }++ for $mock->accepted($mark);
	is(scalar(grep { $_ == 1 } values %acc), 15, 'first round: the mock accepted each conversion once');
	note 'first round requests: ' . join(', ', map { "$_->{pixel}=$_->{auth}/" . ($_->{oauth_set} // '-') . "/$_->{status}" } $mock->requests($mark));
}

######################################################################
# 2. Rotation: X now wants the NEW secrets.  The OLD ones are refused
#    (the mock really checks), the NEW file is used after a reload, without
#    a restart.

$mock->stop;
$mock = start_mock(dir => $mock->dir, port => $mock->port, mock_opts($S{NEW}));
$mark = $mock->mark;
my $off = -s $node->logfile;
fire_each('rot-old');
ok( until_sql($node,
		"SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'rot-old-%' AND status = 'queued' AND last_http_status = 401",
		'5', 30, 'old secrets refused'),
	'with the OLD secrets every pixel gets 401 and its row stays queued');
ok( until_sql($node, "SELECT string_agg(pixel_id || '=' || coalesce(pause_reason, '-'), ',' ORDER BY pixel_id) FROM xcapi_pixel_state()",
		join(',', map { "$_=credentials rejected" } @PIXELS), 10, 'pixel state published'),
	'xcapi_pixel_state: every pixel "credentials rejected"');
{
	my $w = wait_log(qr/WARNING:  xcapi: cannot send conversions of pixel "o8z6j": [^\n]*/, $off, 10, '401 warning');
	ok($w, 'a WARNING says the credentials were refused') and note "log: $w";
	my @req = $mock->requests($mark);
	ok(@req >= 5 && !grep({ ($_->{status} // 0) != 401 } @req),
		sprintf('the mock answered 401 to all %d requests made with the OLD secrets', scalar @req));
	is(scalar(my @a = $mock->accepted($mark)), 0, 'and accepted nothing');
}

write_file_mode($creds, creds_text($S{NEW}));
$mark = $mock->mark;
$off = -s $node->logfile;
my $t_reload = time();
$node->reload;
ok( until_sql($node, "SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'rot-old-%' AND status = 'sent'",
		'5', 30, 'held rows sent after reload'),
	'after the reload the held rows are sent with the NEW secrets');
at_once($t_reload, 'the held rows');
check_schemes($mark, 'after reload');
fire_each('rot-new', 2);
is(sql("SELECT xcapi_wait('60s')"), 't', 'fresh conversions after the reload delivered');
is(status_of('rot-new'), 'sent:10', 'all 10 sent');
check_schemes($mark, 'after reload, fresh');
is(worker_pid($node), $worker, 'same worker process: no restart needed');

######################################################################
# 3. More logging: debug2 and log_statement = all (test SQL, which holds
#    no secret, is logged; anything xcapi logs at debug levels too).

$node->append_conf('postgresql.conf', "log_min_messages = debug2\nlog_statement = 'all'\n");
$node->reload;
ok(until_sql($node, 'SHOW log_statement', 'all', 10, 'log_statement all'), 'now log_min_messages = debug2, log_statement = all');
write_file_mode($creds, "# rewritten\n" . creds_text($S{NEW}));
$node->reload;
$mark = $mock->mark;
fire_each('verbose', 2);
is(sql("SELECT xcapi_wait('60s')"), 't', 'debug2 round delivered');
is(status_of('verbose'), 'sent:10', 'debug2 round: all 10 sent');
check_schemes($mark, 'debug2 round');

######################################################################
# 4. A group-readable file is refused; 0600 again is used.

chmod 0640, $creds;
$off = -s $node->logfile;
$node->reload;
{
	my $w = wait_log(qr/WARNING:  credentials file "\Q$creds\E" has group or world access[^\n]*/, $off, 20, 'group access warning');
	ok($w, 'chmod 640: a WARNING names the file and "group or world access"') and note "log: $w";
	like(log_since($node, $off), qr/HINT:  Run "chmod 600 \Q$creds\E"/, 'with a hint to chmod 600');
}
$mark = $mock->mark;
sql(<<'EOS');
SELECT xcapi_fire('o8z6j', 'tw-o8z6j-abc12', conversion_id => 'perm-o8z6j-' || g, email => 'p' || g || '@example.com') FROM generate_series(1, 2) g;
SELECT xcapi_fire('p0tok', 'tw-p0tok-abc12', conversion_id => 'perm-p0tok-1', email => 'pt@example.com');
EOS
ok( until_sql($node,
		"SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'perm-%' AND status = 'queued' AND attempts = 0 AND last_error LIKE 'no usable credentials%'",
		'3', 30, 'rows held for lack of credentials'),
	'the rows stay queued (attempt not counted), last_error "no usable credentials..."');
ok( until_sql($node, "SELECT string_agg(pixel_id || '=' || coalesce(pause_reason, '-'), ',' ORDER BY pixel_id) FROM xcapi_pixel_state() WHERE pixel_id IN ('o8z6j', 'p0tok')",
		'o8z6j=no usable credentials,p0tok=no usable credentials', 10, 'pixel state published'),
	'xcapi_pixel_state says "no usable credentials"');
note 'last_error: ' . sql("SELECT DISTINCT last_error FROM xcapi_conversions WHERE conversion_id LIKE 'perm-%'");
is(scalar(my @r = $mock->requests($mark)), 0, 'no request was made without credentials');
is(status_of('perm'), 'queued:3', 'nothing sent, nothing dead');

chmod 0600, $creds;
$t_reload = time();
$node->reload;
ok(until_sql($node, "SELECT count(*) FROM xcapi_conversions WHERE conversion_id LIKE 'perm-%' AND status = 'sent'", '3', 30, 'sent after chmod 600'),
	'chmod 600 and reload: the held rows are sent');
at_once($t_reload, 'after chmod 600, the held rows');
is(join(',', sort map { "$_->{pixel}/$_->{status}" } $mock->requests($mark)), 'o8z6j/200,p0tok/200',
	'one accepted request per pixel') or diag explain [ $mock->requests($mark) ];

# stricter than 0600 is fine too
chmod 0400, $creds;
$off = -s $node->logfile;
$node->reload;
sql("SELECT xcapi_fire('o8z6j', 'tw-o8z6j-abc12', conversion_id => 'perm-ro-1', email => 'ro\@example.com')");
ok(until_sql($node, "SELECT status FROM xcapi_conversions WHERE conversion_id = 'perm-ro-1'", 'sent', 30, 'sent with 0400'),
	'chmod 400 (stricter): accepted, delivered');
unlike(log_since($node, $off), qr/credentials file[^\n]*has group or world access/, 'no WARNING for 0400');
chmod 0600, $creds;

######################################################################
# 5. Syntax errors: a WARNING with the file and line number, no value.

my $good = creds_text($S{NEW});
my @good_lines = split /\n/, $good, -1;
my $nd = $S{NEW}{default};
my @cases = (
	[ 'unterminated quote', 5, "consumer_secret = '$nd->{consumer_secret}", qr/Unterminated quoted value/ ],
	[ 'text after the value', 7, "access_token_secret = '$nd->{access_token_secret}' $nd->{access_token_secret}", qr/Unexpected text after the value/ ],
	[ 'a bare secret pasted on its own line', 2, $S{NEW}{pixel_tokens}{p0tok}, qr/Expected a name followed by/ ],
	[ 'an upper-case pixel id', 9, "K7M2P.consumer_secret = '$S{NEW}{k7m2p}{consumer_secret}'", qr/A pixel id has only lower-case letters and digits/ ],
);
for my $c (@cases)
{
	my ($what, $lineno, $line, $detail) = @$c;
	my @l = @good_lines;
	$l[ $lineno - 1 ] = $line;
	write_file_mode($creds, join("\n", @l));
	$off = -s $node->logfile;
	$node->reload;
	my $w = wait_log(qr/WARNING:  syntax error in credentials file "\Q$creds\E", line \d+[^\n]*\n[^\n]*/, $off, 20, "syntax warning ($what)");
	ok($w && $w =~ /line $lineno\b/, "$what: WARNING names the file and line $lineno") and note "log: $w";
	like($w // '', $detail, "$what: the detail says what is wrong");
	my $new_log = log_since($node, $off);
	my @leaked = grep { index($new_log, $_) >= 0 } @ALL_SECRETS;
	ok(!@leaked, "$what: no value echoed in the log") or diag "leaked: @leaked";
}
# an unknown name: file and line named; neither the name nor its value echoed
{
	my @l = @good_lines;
	$l[3] = "consumer_sekret = '$nd->{consumer_secret}'";
	write_file_mode($creds, join("\n", @l));
	$off = -s $node->logfile;
	$node->reload;
	my $w = wait_log(qr/WARNING:  unrecognized name in credentials file "\Q$creds\E", line 4/, $off, 20, 'unknown name warning');
	ok($w, 'an unknown name: WARNING names the file and line 4') and note "log: $w";
	my $new_log = log_since($node, $off);
	ok(!grep({ index($new_log, $_) >= 0 } @ALL_SECRETS), 'unknown name: no value echoed');
}
# Name and value swapped: a secret stands where the name goes.  (Its own
# value, not one of @ALL_SECRETS, so the whole-log check below stays strict.)
# xcapi does not echo an unrecognized name (PostgreSQL's own config parser
# does for postgresql.conf, but this file holds secrets).
{
	my @l = @good_lines;
	my $tok = 'tokSwappedSecret7Lq2Vn';
	$l[1] = "$tok = pixel_token";
	write_file_mode($creds, join("\n", @l));
	$off = -s $node->logfile;
	$node->reload;
	my $w = wait_log(qr/WARNING:  [^\n]*line 2\b[^\n]*/, $off, 20, 'swapped line warning');
	ok($w, 'name and value swapped: a WARNING for line 2') and note "log: $w";
	my $new_log = log_since($node, $off);
	ok(index($new_log, $tok) < 0, 'name and value swapped: the secret is not echoed');
}
$mark = $mock->mark;
sql("SELECT xcapi_fire('o8z6j', 'tw-o8z6j-abc12', conversion_id => 'syntax-o8z6j-1', email => 's\@example.com')");
ok( until_sql($node,
		"SELECT count(*) FROM xcapi_conversions WHERE conversion_id = 'syntax-o8z6j-1' AND status = 'queued' AND last_error LIKE 'no usable credentials%'",
		'1', 30, 'held while the file is broken'),
	'while the file has an error, no credentials are used: the row stays queued');
is(scalar(my @r2 = $mock->requests($mark)), 0, 'and no request is made');
write_file_mode($creds, $good);
$t_reload = time();
$node->reload;
ok(until_sql($node, "SELECT status FROM xcapi_conversions WHERE conversion_id = 'syntax-o8z6j-1'", 'sent', 30, 'sent after the fix'),
	'file fixed and reloaded: sent');
at_once($t_reload, 'after the fix, the held row');

######################################################################
# 6. Nowhere a secret: the queue, pg_settings and SHOW for a non-superuser,
#    error messages, the whole server log.

sub leaks_in
{
	my ($text) = @_;
	return grep { index($text, $_) >= 0 } @ALL_SECRETS;
}

{
	my $q = sql(<<'EOS');
SELECT string_agg(c::text, E'\n') FROM xcapi_conversions c;
SELECT string_agg(s::text, E'\n') FROM xcapi_stats s;
SELECT string_agg(p::text, E'\n') FROM xcapi_pixel_state() p;
SELECT w::text FROM xcapi_worker_state() w;
SELECT string_agg(a::text, E'\n') FROM pg_stat_activity a;
EOS
	my $rows = sql('SELECT count(*) FROM xcapi_conversions');
	my @l = leaks_in($q);
	ok(!@l, "no secret in any column of the $rows xcapi_conversions rows, xcapi_stats, xcapi_pixel_state, xcapi_worker_state, pg_stat_activity")
	  or diag "leaked: @l";
}

{
	my ($out, $err) = ('', '');
	$node->psql('postgres', "SELECT string_agg(s::text, E'\\n') FROM pg_settings s",
		connstr => $analyst_connstr, stdout => \$out, stderr => \$err);
	ok(length($out) > 1000, 'a non-superuser reads pg_settings (' . length($out) . ' bytes)');
	my @l = leaks_in($out . $err);
	ok(!@l, 'pg_settings as a non-superuser: no secret') or diag "leaked: @l";
	unlike($out, qr/xcapi\.credentials_file|\Q$creds\E/, 'pg_settings as a non-superuser: xcapi.credentials_file not listed');

	for my $bad (
		'SHOW xcapi.credentials_file',
		"SELECT current_setting('xcapi.credentials_file')",
		"SET xcapi.credentials_file = '/tmp/elsewhere'",
		"SELECT pg_read_file('$creds')",
		"SELECT xcapi_fire('o8z6j', 'tw-o8z6j-abc12', email => 'a\@example.com')",
		'SELECT count(*) FROM xcapi_conversions',
		'SELECT * FROM xcapi_pixel_state()')
	{
		my ($o, $e) = ('', '');
		my $rc = $node->psql('postgres', $bad, connstr => $analyst_connstr, stdout => \$o, stderr => \$e);
		isnt($rc, 0, "as a non-superuser, fails: $bad");
		push @error_texts, $e . $o;
		note "  -> $e" if $bad =~ /^SHOW/;
		like($e, qr/must be superuser|permission denied/, 'SHOW xcapi.credentials_file as a non-superuser: permission error')
		  if $bad =~ /^SHOW/;
	}
	for my $bad (
		"SELECT xcapi_fire('BAD!', 'tw-o8z6j-abc12', email => 'a\@example.com')",
		"SELECT xcapi_fire('o8z6j', 'tw-k7m2p-abc12', email => 'a\@example.com')",
		"SELECT xcapi_fire('k7m2p', 'tw-k7m2p-abc12')",
		"SET xcapi.credentials_file = '/tmp/elsewhere'",
		"SET xcapi.batchsize = 10",
		"SELECT xcapi_retry(pixel => 'p0tok', error_like => '[')")
	{
		my ($o, $e) = ('', '');
		$node->psql('postgres', $bad, stdout => \$o, stderr => \$e);
		push @error_texts, $e . $o;
	}
	my $all = join("\n", @error_texts);
	my @l2 = leaks_in($all);
	ok(!@l2, sprintf('no secret in %d error answers', scalar @error_texts)) or diag "leaked: @l2\n$all";
}

{
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	my @l = leaks_in($log);
	my $lines = () = $log =~ /\n/g;
	my $debug = () = $log =~ /DEBUG:/g;
	ok(!@l, "whole server log ($lines lines, $debug DEBUG lines): no secret, old or new") or diag "leaked: @l";
	unlike($log, qr/\Q$S{NEW}{pixel_tokens}{p0tok}\E|X-Pixel-Token:|Authorization: OAuth/i, 'no authorization header in the log');
}

note sprintf('004_secrets.pl took %.1f s', time() - $t_start);

on_failure_dump($node, $mock);
$node->stop;
$mock->stop;
done_testing();
