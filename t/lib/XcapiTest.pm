
# Copyright (c) 2026, the xcapi authors
#
# t/lib/XcapiTest.pm -- shared helpers for xcapi's TAP tests: start the mock
# of X (t/mock_x.py), read what it recorded, inject faults, write the
# credentials file, set up a node with xcapi loaded, poll with deadlines, and
# print diagnostics when a test fails.
#
# Use from a t/*.pl file:
#     use FindBin;
#     use lib "$FindBin::RealBin/lib";
#     use XcapiTest;

package XcapiTest;

use strict;
use warnings;

use Carp;
use Cwd qw(abs_path);
use Digest::SHA qw(sha256_hex);
use Exporter 'import';
use File::Basename qw(basename dirname);
use File::Path qw(make_path rmtree);
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @EXPORT = qw(
  %CREDS start_mock write_credentials xcapi_node wait_until
  worker_pid row_summary sha256_hex on_failure_dump
  fire_conversions pending_count status_counts log_since until_sql
);

# X's published example credentials (x-conversions-api.md 6.9.1): real
# shapes, fake values.
our %CREDS = (
	consumer_key        => 'xvz1evFS4wEEPTGEFPHBog',
	consumer_secret     => 'kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw',
	access_token        => '370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb',
	access_token_secret => 'LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE',
	pixel_tokens        => { pxtok1 => 'tok-123' },
);

my $t_dir = dirname(abs_path(__FILE__)) . '/..';
my $python = $ENV{XCAPI_PYTHON} // '/usr/bin/python3';
my @mocks;

# Start t/mock_x.py in a fresh directory under tmp_check and wait until it
# answers its health check.  Returns a XcapiTest::Mock.
# %opts: name (directory suffix), seed; dir and port (restart a mock in place:
# same directory, certificate and records, same port); creds (a hashref
# shaped like %CREDS, instead of it); oauth_sets ({pixel => [consumer_key,
# consumer_secret, access_token, access_token_secret]}: that pixel must be
# signed with its own set); args (more mock_x.py arguments).
sub start_mock
{
	my (%opts) = @_;
	my $creds = $opts{creds} // \%CREDS;
	# A fixed name per test file, kept after the run for post-mortems
	# (tmp_check is emptied by the next "make installcheck").
	my $dir = $opts{dir};
	if (!defined $dir)
	{
		my $name = basename($0, '.pl');
		$dir = "$PostgreSQL::Test::Utils::tmp_check/mock_$name";
		$dir .= "_$opts{name}" if defined $opts{name};
		rmtree($dir);
	}
	make_path($dir);
	unlink "$dir/port";    # a restart in place: wait for the new one
	my @cmd = (
		$python, "$t_dir/mock_x.py",
		'--dir'             => $dir,
		'--consumer-key'    => $creds->{consumer_key},
		'--consumer-secret' => $creds->{consumer_secret},
		'--token'           => $creds->{access_token},
		'--token-secret'    => $creds->{access_token_secret},
		'--seed'            => $opts{seed} // 1);
	push @cmd, '--pixel-token', "$_=$creds->{pixel_tokens}{$_}"
	  for sort keys %{ $creds->{pixel_tokens} || {} };
	push @cmd, '--oauth-set', join(':', $_, @{ $opts{oauth_sets}{$_} })
	  for sort keys %{ $opts{oauth_sets} || {} };
	push @cmd, '--port', $opts{port} if $opts{port};
	push @cmd, @{ $opts{args} } if $opts{args};
	my $log = "$dir/mock.log";
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>>', $log, '2>>', $log);
	my $mock = bless { dir => $dir, harness => $h, log => $log }, 'XcapiTest::Mock';
	push @mocks, $mock;

	wait_until(sub { -s "$dir/port" || !$h->pumpable }, 30,
		'mock writes its port')
	  or BAIL_OUT("mock_x.py did not start:\n" . _slurp_or_empty($log));
	BAIL_OUT("mock_x.py exited:\n" . _slurp_or_empty($log))
	  unless -s "$dir/port";
	chomp(my $port = PostgreSQL::Test::Utils::slurp_file("$dir/port"));
	$mock->{port} = $port;
	$mock->{url}  = "https://127.0.0.1:$port";
	$mock->{ca}   = "$dir/cert.pem";
	wait_until(sub { $mock->health }, 30, 'mock health check')
	  or BAIL_OUT("mock_x.py is not healthy:\n" . _slurp_or_empty($log));
	note "mock of X listening on $mock->{url} (dir $dir)";
	return $mock;
}

# Write a credentials file (mode 0600) like postgresql.conf.
sub write_credentials
{
	my ($path, %extra) = @_;
	my $text = "# xcapi credentials for the TAP tests\n";
	$text .= "$_ = '$CREDS{$_}'\n"
	  for qw(consumer_key consumer_secret access_token access_token_secret);
	$text .= "$_.pixel_token = '$CREDS{pixel_tokens}{$_}'\n"
	  for sort keys %{ $CREDS{pixel_tokens} };
	$text .= "$_ = '$extra{$_}'\n" for sort keys %extra;
	my $old = umask(077);
	open my $fh, '>', $path or die "could not write $path: $!";
	print $fh $text;
	close $fh;
	umask($old);
	chmod 0600, $path;
	return $path;
}

# A started node with xcapi preloaded and pointed at the mock, the extension
# created in "postgres".  %opts: conf (extra postgresql.conf text).
sub xcapi_node
{
	my ($name, $mock, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	my $creds = write_credentials($node->basedir . '/xcapi_credentials');
	$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'xcapi'
xcapi.database = 'postgres'
xcapi.api_url = '$mock->{url}'
xcapi.ca_file = '$mock->{ca}'
xcapi.credentials_file = '$creds'
log_min_messages = info
EOC
	$node->append_conf('postgresql.conf', $opts{conf}) if $opts{conf};
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION xcapi');
	return $node;
}

# Poll $cond (a sub) every 50 ms until it is true or $timeout seconds pass.
# Returns the true value, or 0 after printing a diag.
sub wait_until
{
	my ($cond, $timeout, $what) = @_;
	my $deadline = time() + $timeout;
	while (1)
	{
		my $v = $cond->();
		return $v if $v;
		if (time() > $deadline)
		{
			diag "timed out after ${timeout}s waiting for: $what";
			return 0;
		}
		usleep(50_000);
	}
}

# Queue $n conversions of $pixel with conversion_ids "$prefix<g>", g from
# $from (default 1), in one transaction; returns how many were queued.
sub fire_conversions
{
	my ($node, $pixel, $prefix, $n, $from) = @_;
	$from //= 1;
	my $to = $from + $n - 1;
	return $node->safe_psql('postgres', <<"EOS");
SELECT count(xcapi_fire('$pixel', 'tw-$pixel-o8z2x',
                        conversion_id => '$prefix' || g,
                        email => '$prefix' || g || '\@example.com'))
  FROM generate_series($from, $to) g
EOS
}

# Rows of $pixel not yet finished.
sub pending_count
{
	my ($node, $pixel) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM xcapi_conversions WHERE pixel_id = '$pixel' AND status IN ('queued', 'sending')"
	);
}

# "dead=1 sent=499": rows of $pixel by status.
sub status_counts
{
	my ($node, $pixel) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(string_agg(status || '=' || n, ' ' ORDER BY status), '') FROM (SELECT status, count(*) n FROM xcapi_conversions WHERE pixel_id = '$pixel' GROUP BY status) s"
	);
}

# The server log from byte $offset (default 0) on.
sub log_since
{
	my ($node, $offset) = @_;
	return substr(PostgreSQL::Test::Utils::slurp_file($node->logfile),
		$offset // 0);
}

# Wait until query $q answers $want; on a timeout print the last answer.
sub until_sql
{
	my ($node, $q, $want, $timeout, $what) = @_;
	my $got;
	my $ok = wait_until(sub { ($got = $node->safe_psql('postgres', $q)) eq $want },
		$timeout, $what);
	diag "last answer: $got" unless $ok;
	return $ok;
}

# The pid of the xcapi worker, or '' if none.
sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE backend_type = 'xcapi worker'"
	);
}

sub row_summary
{
	my ($node) = @_;
	return $node->safe_psql('postgres', q{
		SELECT status, count(*), min(attempts), max(attempts),
		       string_agg(DISTINCT coalesce(last_http_status::text, '-'), ','),
		       left(string_agg(DISTINCT last_error, ' | '), 300)
		  FROM xcapi_conversions GROUP BY status ORDER BY status});
}

# If anything failed so far, print what helps: the server log without the
# test's own statements, the queue by status, the mock's last requests.
# Call it before stopping the node (the row summary needs the server); it is
# safe to call again from an END block, which then does nothing.
my $dumped;

sub on_failure_dump
{
	my ($node, $mock) = @_;
	local $?;    # may run in an END block: keep the exit status
	return if $dumped || Test::More->builder->is_passing;
	$dumped = 1;
	diag "---- failure diagnostics ----";
	if ($node)
	{
		# The test's own statements (log_statement = all) are noise here.
		my (@lines, $in_stmt);
		for (split /\n/, _slurp_or_empty($node->logfile))
		{
			if (/^\s/) { push @lines, $_ unless $in_stmt; next; }
			$in_stmt = /LOG:  statement: /;
			push @lines, $_ unless $in_stmt;
		}
		@lines = @lines[ -80 .. -1 ] if @lines > 80;
		diag "server log (tail, statements left out):\n" . join("\n", @lines);
		my $rows = eval { row_summary($node) } // "($@)";
		diag "xcapi_conversions by status:\n$rows";
	}
	if ($mock)
	{
		my @req = split /\n/, _slurp_or_empty("$mock->{dir}/requests.jsonl");
		@req = @req[ -20 .. -1 ] if @req > 20;
		for (@req)
		{
			# Shorten the id lists so the output stays readable.
			s/("conversion_ids":\[)([^\]]{200})[^\]]*\]/$1$2...]/;
			s/("event_ids":\[)([^\]]{80})[^\]]*\]/$1$2...]/;
		}
		diag "mock requests.jsonl (tail):\n" . join("\n", @req);
		diag "mock log:\n" . _slurp_or_empty($mock->{log});
	}
}

sub _slurp_or_empty
{
	my ($path) = @_;
	return '' unless -e $path;
	return PostgreSQL::Test::Utils::slurp_file($path);
}

END
{
	local $?;
	$_->stop for @mocks;
}

package XcapiTest::Mock;

use strict;
use warnings;

use JSON::PP;
use Test::More;

my $json = JSON::PP->new->utf8->allow_nonref;

sub dir  { $_[0]{dir} }
sub port { $_[0]{port} }
sub url  { $_[0]{url} }
sub ca   { $_[0]{ca} }

sub health
{
	my ($self) = @_;
	my $out = '';
	# Python, not curl: one dependency fewer, same certificate check.
	my $py = <<'EOP';
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
try:
    r = urllib.request.urlopen(sys.argv[2], context=ctx, timeout=5)
    sys.stdout.write(r.read().decode())
except Exception as e:
    sys.stderr.write(str(e))
EOP
	IPC::Run::run([ $python, '-c', $py, $self->{ca}, "$self->{url}/_mock/health" ],
		'>', \$out, '2>', \my $err);
	return $out eq 'ok';
}

sub _read_jsonl
{
	my ($path) = @_;
	return () unless -e $path;
	open my $fh, '<', $path or die "could not read $path: $!";
	my @recs;
	while (my $line = <$fh>)
	{
		# Only complete lines: the mock may be writing right now.
		last unless $line =~ /\n\z/;
		push @recs, $json->decode($line);
	}
	close $fh;
	return @recs;
}

# Every request recorded so far (array of hashrefs); with $since (a value
# from mark), only those after it.
sub requests
{
	my ($self, $since) = @_;
	my @r = _read_jsonl("$self->{dir}/requests.jsonl");
	return @r[ ($since // {})->{requests} // 0 .. $#r ];
}

# Every accepted conversion ({t, pixel, conversion}).
sub accepted
{
	my ($self, $since) = @_;
	my @r = _read_jsonl("$self->{dir}/accepted.jsonl");
	return @r[ ($since // {})->{accepted} // 0 .. $#r ];
}

# A position in both logs, to look only at what happens after it.
sub mark
{
	my ($self) = @_;
	my @req = _read_jsonl("$self->{dir}/requests.jsonl");
	my @acc = _read_jsonl("$self->{dir}/accepted.jsonl");
	return { requests => scalar(@req), accepted => scalar(@acc) };
}

sub raw_accepted
{
	my ($self) = @_;
	my $path = "$self->{dir}/accepted.jsonl";
	return -e $path ? PostgreSQL::Test::Utils::slurp_file($path) : '';
}

# Replace the fault set (atomically); undef or {} clears it.
sub set_faults
{
	my ($self, $faults) = @_;
	my $path = "$self->{dir}/faults.json";
	if (!$faults || !%$faults)
	{
		unlink $path;
		return;
	}
	my $tmp = "$path.tmp$$";
	open my $fh, '>', $tmp or die "could not write $tmp: $!";
	print $fh $json->encode($faults);
	close $fh;
	rename $tmp, $path or die "could not rename $tmp: $!";
}

sub stop
{
	my ($self) = @_;
	my $h = $self->{harness} or return;
	delete $self->{harness};
	return unless $h->pumpable;
	$h->signal('TERM');
	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm 10;
		$h->finish;
		alarm 0;
	};
	if ($@)
	{
		$h->kill_kill;
	}
}

# Cheap readers for big runs (JSON::PP decodes a few thousand lines a
# second).  Only complete lines count: the mock may be writing right now.
# A quick_mark is interchangeable with a mark.

sub _complete_lines
{
	my ($path, $skip) = @_;
	return () unless -e $path;
	open my $fh, '<', $path or die "could not read $path: $!";
	my @lines;
	my $n = 0;
	while (my $line = <$fh>)
	{
		last unless $line =~ /\n\z/;
		push @lines, $line if $n++ >= ($skip // 0);
	}
	close $fh;
	return @lines;
}

sub _count_complete_lines
{
	my ($path) = @_;
	return 0 unless -e $path;
	open my $fh, '<', $path or die "could not read $path: $!";
	my $n = 0;
	while (my $line = <$fh>)
	{
		last unless $line =~ /\n\z/;
		$n++;
	}
	close $fh;
	return $n;
}

# Like mark, without decoding anything.
sub quick_mark
{
	my ($self) = @_;
	return {
		requests => _count_complete_lines("$self->{dir}/requests.jsonl"),
		accepted => _count_complete_lines("$self->{dir}/accepted.jsonl") };
}

# How many conversions were accepted (after $since, a mark).
sub accepted_count
{
	my ($self, $since) = @_;
	return _count_complete_lines("$self->{dir}/accepted.jsonl")
	  - (($since // {})->{accepted} // 0);
}

# { conversion_id => times accepted } after $since, optionally of one pixel
# only; read with a regex, not decoded.
sub accepted_ids
{
	my ($self, $since, $pixel) = @_;
	my %ids;
	for (_complete_lines("$self->{dir}/accepted.jsonl",
			($since // {})->{accepted}))
	{
		next if defined $pixel && !/"pixel":"\Q$pixel\E"/;
		$ids{$1}++ if /"conversion_id":"((?:[^"\\]|\\.)*)"/;
	}
	return \%ids;
}

# Requests after $since (decoded), without decoding the ones before it;
# optionally of one pixel only.
sub requests_since
{
	my ($self, $since, $pixel) = @_;
	my @r;
	for (_complete_lines("$self->{dir}/requests.jsonl",
			($since // {})->{requests}))
	{
		next if defined $pixel && !/"pixel":"\Q$pixel\E"/;
		push @r, $json->decode($_);
	}
	return @r;
}

1;

