# bench/lib.sh — shared set-up for the benchmark scripts in bench/.
#
# Sourced, not run.  The benchmark scripts run as root (apt-get, make
# install, perf, reading /proc of other users' processes); every server they
# start (PostgreSQL, nginx, the Python mock) runs as the unprivileged OS user
# $XCAPI_USER in a throwaway directory under /tmp, and is stopped by an EXIT
# trap.  Clients (psql, pgbench, Python drivers) run as root and connect over
# the cluster's Unix socket as role $XCAPI_USER (trust authentication).
#
# Benchmarks report; they never pass or fail on timing.

# shellcheck shell=bash
# shellcheck disable=SC2034

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# xc_* helpers: packages, OS user, xc_as_user, logging.
# shellcheck source=scripts/lib.sh
. "$BENCH_DIR/../scripts/lib.sh"

PG_PKGLIBDIR=$("$PG_CONFIG" --pkglibdir 2>/dev/null || echo /usr/lib/postgresql/$PG_MAJOR/lib)
BENCH_OUT=$BENCH_DIR/out

# bench_option ARG: the options every benchmark takes (--no-build, --keep,
# --help: its header comment); anything else is an error.
bench_option() {
    case $1 in
        --no-build) BENCH_NO_BUILD=1 ;;
        --keep) BENCH_KEEP=1 ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[-1]}"; exit 0 ;;
        *) xc_die "unrecognized argument: $1 (see --help)" ;;
    esac
}

# bench_begin NAME EXTRA_PACKAGE...: what every benchmark does first:
# set-up (bench_setup NAME.sh ...), its work directory, the traps that
# clean it up, and the report file that mirrors stdout.
bench_begin() {
    local name=$1
    shift
    xc_step "Set-up"
    bench_setup "$name.sh" "$@"
    bench_workdir "$name"
    bench_traps
    bench_report "$name"
}

# bench_setup NAME EXTRA_PACKAGE...: root check, packages (idempotent), the
# OS user, and `make && make install` of this checkout unless --no-build
# (BENCH_NO_BUILD=1) was given.
bench_setup() {
    local name=$1
    shift
    xc_require_root "bench/$name"
    XC_PACKAGES+=(procps "$@")
    xc_install_packages
    xc_ensure_user
    if [ "${BENCH_NO_BUILD:-0}" = 1 ]; then
        [ -f "$PG_PKGLIBDIR/xcapi.so" ] || xc_die "xcapi.so is not installed and --no-build was given"
        xc_info "build: skipped (--no-build); using $PG_PKGLIBDIR/xcapi.so"
    else
        local log
        log=$(mktemp /tmp/xcapi-bench-build.XXXXXX.log)
        if ! { make -C "$XC_REPO" --no-print-directory PG_CONFIG="$PG_CONFIG" -j"$(nproc)" &&
               make -C "$XC_REPO" --no-print-directory PG_CONFIG="$PG_CONFIG" install; } >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            xc_die "make && make install failed in $XC_REPO (log: $log)"
        fi
        rm -f "$log"
        xc_info "build: make && make install in $XC_REPO ($(git -C "$XC_REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$XC_REPO" diff --quiet -- src 2>/dev/null || echo ', src modified'))"
    fi
    mkdir -p "$BENCH_OUT"
}

# bench_workdir NAME: a fresh directory owned by $XCAPI_USER, in BENCH_WORK.
bench_workdir() {
    BENCH_WORK=$(mktemp -d "/tmp/xcapi-bench-$1.XXXXXX")
    chmod 755 "$BENCH_WORK"
    chown "$XCAPI_USER:" "$BENCH_WORK"
}

# Processes and clusters to stop on exit.
BENCH_CLUSTERS=()
BENCH_PIDS=()
BENCH_PIDFILES=()
BENCH_KEEP=0

bench_cleanup() {
    local rc=$? d p
    trap - EXIT INT TERM
    for d in "${BENCH_CLUSTERS[@]}"; do
        if [ -f "$d/postmaster.pid" ]; then
            xc_as_user pg_ctl -D "$d" -m fast -w -t 60 stop >/dev/null 2>&1 ||
                xc_as_user pg_ctl -D "$d" -m immediate -w stop >/dev/null 2>&1 ||
                xc_warn "could not stop the cluster in $d"
        fi
    done
    for d in "${BENCH_PIDFILES[@]}"; do
        [ -s "$d" ] && BENCH_PIDS+=("$(tr -dc 0-9 <"$d")")
    done
    for p in "${BENCH_PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    if [ -n "${BENCH_WORK:-}" ] && [ -d "$BENCH_WORK" ]; then
        if [ "$BENCH_KEEP" = 1 ] || [ $rc -ne 0 ]; then
            xc_info "work directory kept: $BENCH_WORK"
        else
            rm -rf "$BENCH_WORK"
        fi
    fi
    exit $rc
}

bench_traps() {
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# bench_report NAME: from here on, a copy of everything printed goes to
# $BENCH_OUT/NAME-<UTC time>.txt (sets REPORT).
bench_report() {
    REPORT=$BENCH_OUT/$1-$(date -u +%Y%m%dT%H%M%SZ).txt
    exec > >(tee "$REPORT")
}

# bench_cluster_init DATA PORT DB: initdb as $XCAPI_USER, Unix socket only
# (in DATA's parent), database DB created before xcapi is preloaded (the
# worker connects to it at start-up).  Extra postgresql.conf lines are read
# from standard input.  Sets PSQL_ARGS to connect to DB there.
bench_cluster_init() {
    local data=$1 port=$2 db=$3 sockdir
    sockdir=$(dirname "$data")
    xc_as_user initdb -D "$data" -A trust -E UTF8 --locale=C.UTF-8 -U "$XCAPI_USER" \
        >"$sockdir/initdb.log" 2>&1 || { tail -n 20 "$sockdir/initdb.log" >&2; xc_die "initdb failed"; }
    cat >>"$data/postgresql.conf" <<EOF

# --- xcapi bench ---
listen_addresses = ''
unix_socket_directories = '$sockdir'
port = $port
log_line_prefix = '%m [%p] %q%b '
EOF
    echo "CREATE DATABASE $db" |
        xc_as_user postgres --single -D "$data" postgres >"$sockdir/createdb.log" 2>&1 ||
        { tail -n 20 "$sockdir/createdb.log" >&2; xc_die "could not create database $db"; }
    cat >>"$data/postgresql.conf"
    chown "$XCAPI_USER:" "$data/postgresql.conf"
    PSQL_ARGS=(-h "$sockdir" -p "$port" -U "$XCAPI_USER" -d "$db")
}

# bench_cluster_start DATA [LOG]
bench_cluster_start() {
    local data=$1 log=${2:-$(dirname "$1")/postgres.log}
    BENCH_CLUSTERS+=("$data")
    if ! xc_as_user pg_ctl -D "$data" -l "$log" -w -t 120 start >/dev/null 2>&1; then
        tail -n 30 "$log" >&2
        xc_die "the cluster in $data did not start (log: $log)"
    fi
}

bench_cluster_stop() {
    xc_as_user pg_ctl -D "$1" -m fast -w -t 120 stop >/dev/null 2>&1 || xc_warn "could not stop $1"
}

bench_cluster_reload() {
    xc_as_user pg_ctl -D "$1" reload >/dev/null
}

# PSQL_ARGS must hold the connection options, e.g. (-h DIR -p PORT -U xcapi -d bench).
psqlb() { "$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 "${PSQL_ARGS[@]}" "$@"; }
psqlv() { psqlb -At "$@"; }

# worker_pid: pid of the xcapi worker ('' if none).
worker_pid() {
    psqlv -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'xcapi worker' LIMIT 1" 2>/dev/null
}

# proc_kb PID FIELD: a /proc/PID/status field in kB (VmRSS, RssAnon, ...).
proc_kb() {
    awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/status" 2>/dev/null
}

# proc_cpu_ticks PID: utime + stime in clock ticks.
proc_cpu_ticks() {
    # fields after the ")" of the command name: state is 3, utime 14, stime 15
    sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }'
}
CLK_TCK=$(getconf CLK_TCK)

# median of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# fmt NUMBER DECIMALS
fmt() { LC_ALL=C printf "%.${2:-1}f" "$1"; }
# ratio A B DECIMALS: A / B
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-3}" 'BEGIN { if (b == 0) print "n/a"; else printf "%.*f", d, a / b }'; }

# bench_header TITLE: what ran where.
bench_header() {
    printf '%s%s%s\n' "$XC_BOLD" "$1" "$XC_RESET"
    printf '  date        %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    printf '  commit      %s%s\n' "$(git -C "$XC_REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(git -C "$XC_REPO" diff --quiet -- src '*.sql' 2>/dev/null ||
           echo " + uncommitted changes to src/ or *.sql (diff sha1 $(git -C "$XC_REPO" diff -- src '*.sql' | sha1sum | cut -c1-12))")"
    printf '  machine     %s cores, %s GiB, %s\n' "$(nproc)" \
        "$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)"
    printf '  PostgreSQL  %s\n' "$("$PG_BINDIR/postgres" --version | awk '{ print $3 }')"
    printf '  load avg    %s (before the run; other work on the machine skews results)\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
}

# xcapi_settings: every xcapi.* setting of the connected cluster, one line.
xcapi_settings() {
    psqlv -c "SELECT string_agg(replace(name, 'xcapi.', '') || '=' || setting || coalesce(unit, ''), ' ' ORDER BY name)
              FROM pg_settings WHERE name LIKE 'xcapi.%' AND name NOT IN ('xcapi.credentials_file', 'xcapi.ca_file')"
}

# Start the bundled mock of X (t/mock_x.py) as the xcapi user in
# $BENCH_WORK/mock, accepting the example credentials above; sets MOCK and
# MOCK_PORT.  Its pid file is stopped by the EXIT trap.
bench_start_mock() {
    MOCK=$BENCH_WORK/mock
    mkdir -p "$MOCK"
    cp "$XC_REPO/t/mock_x.py" "$BENCH_WORK/mock_x.py"
    chown -R "$XCAPI_USER:" "$MOCK" "$BENCH_WORK/mock_x.py"
    BENCH_PIDFILES+=("$BENCH_WORK/mock.pid")
    # shellcheck disable=SC2016  # expanded by the inner sh
    xc_as_user sh -c 'echo $$ >"$1/mock.pid"; shift; exec "$@"' sh "$BENCH_WORK" \
        "$PYTHON" "$BENCH_WORK/mock_x.py" --dir "$MOCK" \
        --consumer-key "$CONSUMER_KEY" --consumer-secret "$CONSUMER_SECRET" \
        --token "$ACCESS_TOKEN" --token-secret "$ACCESS_TOKEN_SECRET" \
        >"$BENCH_WORK/mock.log" 2>&1 &
    MOCK_PORT=''
    for _ in $(seq 1 300); do
        if [ -s "$MOCK/port" ]; then MOCK_PORT=$(tr -dc 0-9 <"$MOCK/port"); break; fi
        sleep 0.1
    done
    [ -n "$MOCK_PORT" ] || { tail -n 20 "$BENCH_WORK/mock.log" >&2; xc_die "the mock did not start"; }
}

# Write the example credentials to $BENCH_WORK/credentials.conf (0600, owned
# by the xcapi user); sets CREDS.
bench_write_credentials() {
    CREDS=$BENCH_WORK/credentials.conf
    xc_write_credentials "$CREDS"
    chown "$XCAPI_USER:" "$CREDS"
}
