#!/usr/bin/env bash
# scripts/demo.sh — xcapi end to end: payments in PostgreSQL become signed
# conversions at a local mock of X's Conversion API.
#
#   sudo scripts/demo.sh [--clean]
#
#   --clean      remove the demo directory at the end (kept by default)
#   -h, --help
#
# As root it installs missing packages, creates the OS user "xcapi", builds
# and installs the extension from a copy of this tree, then, as "xcapi", in a
# fresh /tmp/xcapi-demo.XXXXXX: starts t/mock_x.py (HTTPS, self-signed
# certificate, checks every OAuth 1.0a signature with python3-oauthlib),
# writes a credentials file, creates a throwaway cluster with xcapi preloaded,
# adds a trigger on a payments table, inserts 5 payments, one rolled back and
# 1,000 in one statement, waits with xcapi_wait() and shows what the database
# and the mock saw.  The cluster and the mock are stopped on exit.  Exits
# non-zero if any check fails.

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

DEMO_PORT=5499            # unix socket only, in the demo directory
BULK=1000

section() { printf '\n%s── %s %s%s\n' "$XC_BOLD" "$1" \
    "$(printf '─%.0s' $(seq 1 $((60 - ${#1}))))" "$XC_RESET"; }
kv() { printf '  %-24s %s\n' "$1" "$2"; }
# Indent psql's output and drop the blank lines it ends with.
indent() { sed -e 's/^/  /' -e 's/^ *$//' | cat -s | sed -e '${/^$/d}'; }
show_sql() { printf '%s  %s%s\n' "$XC_DIM" "${1//$'\n'/$'\n  '}" "$XC_RESET"; }
psqlx() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }

# ---------------------------------------------------------------------------
# Part 2, as the unprivileged user: everything that runs a server.
# ---------------------------------------------------------------------------

# On exit, however it happens: stop the cluster and the mock this run started.
stop_all() {
    local rc=$?
    if [ "${PG_STARTED:-0}" -eq 1 ]; then
        pg_ctl -D "$DATA" -m fast -w stop >/dev/null 2>&1 ||
            xc_warn "could not stop the demo cluster in $DATA"
    fi
    if [ -n "${MOCK_PID:-}" ] && kill -0 "$MOCK_PID" 2>/dev/null; then
        kill -TERM "$MOCK_PID" 2>/dev/null || true
        wait "$MOCK_PID" 2>/dev/null || true
    fi
    return $rc
}

inner() {
    DEMO=$1 CLEAN=$2
    # Globals, not locals: the EXIT trap may run after inner has returned.
    DATA=$DEMO/data MOCK_PID='' PG_STARTED=0
    local mock=$DEMO/mock data=$DATA
    export PGHOST=$DEMO PGPORT=$DEMO_PORT PGDATABASE=demo
    trap stop_all EXIT
    trap 'exit 130' INT TERM

    # -- the mock X endpoint -------------------------------------------------
    mkdir -p "$mock"
    "$PYTHON" "$DEMO/src/t/mock_x.py" --dir "$mock" \
        --consumer-key "$CONSUMER_KEY" --consumer-secret "$CONSUMER_SECRET" \
        --token "$ACCESS_TOKEN" --token-secret "$ACCESS_TOKEN_SECRET" \
        >"$mock/mock.log" 2>&1 &
    mock_pid=$!
    MOCK_PID=$mock_pid
    local i mock_port=''
    for ((i = 0; i < 300; i++)); do
        if [ -s "$mock/port" ]; then mock_port=$(tr -dc 0-9 <"$mock/port"); break; fi
        kill -0 "$mock_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$mock_port" ]; then
        tail -n 20 "$mock/mock.log" >&2
        xc_die "the mock X endpoint did not start (log: $mock/mock.log)"
    fi

    # -- credentials: a file, never a GUC ------------------------------------
    xc_write_credentials "$DEMO/credentials.conf"

    # -- a throwaway cluster --------------------------------------------------
    initdb -D "$data" -A trust -E UTF8 --locale=C.UTF-8 >"$DEMO/initdb.log" 2>&1 ||
        { tail -n 20 "$DEMO/initdb.log" >&2; xc_die "initdb failed"; }
    cat >>"$data/postgresql.conf" <<EOF

# --- xcapi demo ---
listen_addresses = ''
unix_socket_directories = '$DEMO'
port = $DEMO_PORT
log_line_prefix = '%m [%p] %q%b '
EOF
    # The worker connects to xcapi.database at start-up, so create it first,
    # in single-user mode, before xcapi is preloaded.
    echo 'CREATE DATABASE demo' |
        postgres --single -D "$data" postgres >"$DEMO/createdb.log" 2>&1 ||
        { tail -n 20 "$DEMO/createdb.log" >&2; xc_die "could not create database demo"; }
    cat >>"$data/postgresql.conf" <<EOF
shared_preload_libraries = 'xcapi'
xcapi.database = 'demo'
xcapi.api_url = 'https://127.0.0.1:$mock_port'
xcapi.ca_file = '$mock/cert.pem'
xcapi.credentials_file = '$DEMO/credentials.conf'
EOF
    PG_STARTED=1
    if ! pg_ctl -D "$data" -l "$DEMO/postgres.log" -w -t 60 start >/dev/null 2>&1; then
        tail -n 30 "$DEMO/postgres.log" >&2
        xc_die "the demo cluster did not start (log: $DEMO/postgres.log)"
    fi

    section "xcapi demo"
    kv "mock X endpoint" "https://127.0.0.1:$mock_port  (t/mock_x.py, pid $mock_pid)"
    kv "PostgreSQL" "$(postgres --version | awk '{ print $3 }'), socket $DEMO, port $DEMO_PORT"
    kv "credentials" "$DEMO/credentials.conf (mode 600)"

    # -- schema ----------------------------------------------------------------
    local setup_sql
    setup_sql=$(cat <<'EOF'
CREATE EXTENSION xcapi;
CREATE TABLE payments (
    id             bigserial PRIMARY KEY,
    customer_email text NOT NULL,
    amount         numeric(12,2) NOT NULL,
    currency       text NOT NULL DEFAULT 'USD',
    created_at     timestamptz NOT NULL DEFAULT now());
CREATE TRIGGER payments_to_x AFTER INSERT ON payments
    FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger(
        'o8z6j', 'tw-o8z6j-o8z2x', 'conversion_id=id', 'value=amount',
        'currency=currency', 'email=customer_email');
EOF
)
    section "setup"
    show_sql "$setup_sql"
    psqlx <<<"$setup_sql"

    # -- business as usual -----------------------------------------------------
    local singles_sql rollback_sql bulk_sql rb_id t0 t1 waited
    singles_sql=$(cat <<'EOF'
INSERT INTO payments (customer_email, amount) VALUES ('  Alice@Example.COM ', 19.99);
INSERT INTO payments (customer_email, amount, currency) VALUES ('bob@example.org', 5.00, 'EUR');
INSERT INTO payments (customer_email, amount) VALUES ('carol@example.net', 120.50);
INSERT INTO payments (customer_email, amount, currency) VALUES ('dave@example.com', 9.90, 'GBP');
INSERT INTO payments (customer_email, amount) VALUES ('erin@example.com', 42.00);
EOF
)
    rollback_sql=$(cat <<'EOF'
BEGIN;
INSERT INTO payments (customer_email, amount)
    VALUES ('changed.my.mind@example.com', 250.00) RETURNING id;
ROLLBACK;
EOF
)
    bulk_sql=$(cat <<EOF
BEGIN;
INSERT INTO payments (customer_email, amount)
    SELECT format('customer%s@example.com', g), 10 + g % 90
    FROM generate_series(1, $BULK) AS g;
COMMIT;
EOF
)
    section "payments: 5 single inserts, 1 rolled back, $BULK in one transaction"
    show_sql "$singles_sql"
    show_sql "$rollback_sql"
    show_sql "$bulk_sql"
    t0=$EPOCHREALTIME
    psqlx <<<"$singles_sql"
    rb_id=$(psqlx -At <<<"$rollback_sql")
    psqlx <<<"$bulk_sql"
    waited=$(psqlx -At -c "SELECT xcapi_wait('30s')")
    t1=$EPOCHREALTIME
    kv "xcapi_wait('30s')" "$( [ "$waited" = t ] && echo true || echo "$waited")  ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f s", b - a }') from the first insert)"
    kv "rolled back" "payment $rb_id (changed.my.mind@example.com)"

    # -- what the database says --------------------------------------------------
    local cols=100
    [ -t 1 ] && cols=$(tput cols 2>/dev/null || echo 100)
    section "SELECT * FROM xcapi_stats"
    psqlx -P footer=off -P columns="$cols" -P expanded=auto -c 'SELECT * FROM xcapi_stats' | indent

    section "xcapi_conversions (first 3, last 2)"
    psqlx -P footer=off <<'EOF' | indent
SELECT id, conversion_id, status, attempts,
       to_char(sent_at, 'HH24:MI:SS.MS') AS sent_at,
       payload->>'value' AS value,
       left(jsonb_path_query_first(payload::jsonb, '$.identifiers[*].hashed_email') #>> '{}', 16) || '…'
           AS hashed_email
FROM xcapi_conversions
WHERE id IN (SELECT id FROM xcapi_conversions ORDER BY id LIMIT 3)
   OR id IN (SELECT id FROM xcapi_conversions ORDER BY id DESC LIMIT 2)
ORDER BY id;
EOF

    section "payload of the first conversion, as queued and sent"
    psqlx -At -c 'SELECT jsonb_pretty(payload::jsonb) FROM xcapi_conversions ORDER BY id LIMIT 1' |
        sed 's/^/  /'

    # -- checks on the database side -------------------------------------------
    local fails=0 rows sent raw hash_ok rb_rows
    ok()   { printf '  %sok%s    %s\n' "$XC_GREEN" "$XC_RESET" "$1"; }
    fail() { printf '  %sFAIL%s  %s\n' "$XC_RED" "$XC_RESET" "$1"; fails=$((fails + 1)); }
    check() { if [ "$1" = "$2" ]; then ok "$3"; else fail "$3 (got $1, want $2)"; fi; }
    local want=$((5 + BULK))
    IFS='|' read -r rows sent raw hash_ok rb_rows < <(psqlx -At -v rb="$rb_id" <<'EOF'
SELECT (SELECT count(*) FROM xcapi_conversions),
       (SELECT count(*) FROM xcapi_conversions WHERE status = 'sent'),
       (SELECT count(*) FROM xcapi_conversions c WHERE c::text ~ '@'),
       (SELECT jsonb_path_query_first(payload::jsonb, '$.identifiers[*].hashed_email') #>> '{}'
               = encode(sha256(convert_to('alice@example.com', 'UTF8')), 'hex')
        FROM xcapi_conversions WHERE conversion_id = '1'),
       (SELECT count(*) FROM xcapi_conversions WHERE conversion_id = :'rb');
EOF
) || true
    section "checks: the database"
    check "$waited" t "xcapi_wait('30s') returned true: nothing left queued or sending"
    check "$rows" "$want" "$want conversions queued, one per committed payment"
    check "$sent" "$want" "all $want are 'sent'"
    check "$raw" 0 "no raw email in xcapi_conversions (no '@' in any row)"
    check "$hash_ok" t "'  Alice@Example.COM ' stored as sha256('alice@example.com')"
    check "$rb_rows" 0 "rolled-back payment $rb_id was never queued"

    # -- what X (the mock) saw -------------------------------------------------
    section "checks: what the mock X endpoint received"
    psqlx -At -c 'SELECT id FROM payments ORDER BY id' >"$DEMO/payment_ids.txt"
    "$PYTHON" - "$mock" "$DEMO/payment_ids.txt" "$rb_id" "$PIXEL" "$EVENT" <<'EOF' || fails=$((fails + $?))
import collections, hashlib, json, os, sys

mock, ids_file, rb_id, pixel, event = sys.argv[1:]
use_color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
G, R, X = ("\033[32m", "\033[31m", "\033[0m") if use_color else ("", "", "")
fails = 0

def ok(msg):
    print("  %sok%s    %s" % (G, X, msg))

def fail(msg):
    global fails
    fails += 1
    print("  %sFAIL%s  %s" % (R, X, msg))

def check(cond, msg, why=""):
    ok(msg) if cond else fail(msg + (" (%s)" % why if why else ""))

def load(name):
    try:
        with open(os.path.join(mock, name), encoding="utf-8") as f:
            return [json.loads(l) for l in f if l.strip()]
    except FileNotFoundError:
        return []

reqs = load("requests.jsonl")
acc = load("accepted.jsonl")
want = [l.strip() for l in open(ids_file) if l.strip()]

statuses = collections.Counter(r.get("status") for r in reqs)
auths = collections.Counter(r.get("auth") for r in reqs)
nonces = [r.get("nonce") for r in reqs if r.get("nonce")]
sizes = [r.get("n") or 0 for r in reqs]
got = collections.Counter(str(a["conversion"].get("conversion_id")) for a in acc)
rb_hash = hashlib.sha256(b"changed.my.mind@example.com").hexdigest()
hashes = {i.get("hashed_email") for a in acc
          for i in a["conversion"].get("identifiers") or [] if isinstance(i, dict)}

def fmt_sizes(s):
    s = [str(x) for x in s]
    return " + ".join(s) if len(s) <= 8 else " + ".join(s[:7]) + " + ... (%d requests)" % len(s)

print("  %-24s %d  (%s)" % ("requests", len(reqs),
      ", ".join("HTTP %s: %d" % kv for kv in sorted(statuses.items(), key=str))))
print("  %-24s %s" % ("conversions per request", fmt_sizes(sizes)))
print("  %-24s %d accepted, %d distinct conversion_ids" % ("conversions", len(acc), len(got)))
if reqs:
    span = max(r.get("t_done") or r["t"] for r in reqs) - min(r["t"] for r in reqs)
    print("  %-24s %.3f s from the first request to the last answer" % ("delivery", span))
print()
check(reqs and statuses.get(200, 0) == len(reqs), "every request answered HTTP 200",
      ", ".join("%s: %d" % kv for kv in statuses.items()))
check(reqs and auths.get("oauth", 0) == len(reqs),
      "every request signed with OAuth 1.0a HMAC-SHA1 and verified by python3-oauthlib",
      ", ".join("%s: %d" % kv for kv in auths.items()))
check(len(nonces) == len(reqs) and len(set(nonces)) == len(nonces),
      "a fresh nonce on every request", "%d nonces for %d requests" % (len(set(nonces)), len(reqs)))
check(all(r.get("pixel") == pixel for r in reqs), "all sent to pixel %s" % pixel)
check(all(a["conversion"].get("event_id") == event for a in acc), "all for event %s" % event)
missing = [i for i in want if i not in got]
extra = [i for i in got if i not in want]
check(not missing and not extra,
      "each of the %d committed payments arrived" % len(want),
      "missing %s, unexpected %s" % (missing[:5], extra[:5]))
dups = sum(c - 1 for c in got.values() if c > 1)
if dups:
    print("  note  %d conversions arrived more than once (at-least-once; X deduplicates by conversion_id)" % dups)
check(rb_id not in got and rb_hash not in hashes,
      "rolled-back payment %s never arrived (neither its id nor its email hash)" % rb_id)
check(not any("@" in json.dumps(a["conversion"]) for a in acc), "no raw email reached X")
sys.exit(min(fails, 100))
EOF

    section "logs"
    kv "server" "$DEMO/postgres.log"
    kv "mock requests" "$mock/requests.jsonl"
    kv "mock conversions" "$mock/accepted.jsonl"
    kv "mock output" "$mock/mock.log"
    echo
    echo "  the worker's last lines in the server log:"
    grep -E '(LOG|WARNING|ERROR|FATAL|PANIC):  xcapi' "$DEMO/postgres.log" |
        tail -n 5 | cut -c1-160 | sed "s/^/  ${XC_DIM}/; s/\$/${XC_RESET}/" || true
    echo
    if [ "$CLEAN" = 1 ]; then
        printf '  (%s will be removed: --clean)\n' "$DEMO"
    else
        printf '  Everything is kept in %s; remove it with: sudo rm -rf %s\n' "$DEMO" "$DEMO"
    fi
    if [ $fails -ne 0 ]; then
        printf '\n%sxcapi demo: %d check(s) FAILED%s\n' "$XC_RED$XC_BOLD" "$fails" "$XC_RESET"
        return 1
    fi
    printf '\n%sxcapi demo: all checks passed%s\n' "$XC_GREEN$XC_BOLD" "$XC_RESET"
}

# ---------------------------------------------------------------------------
# Part 1, as root: packages, OS user, build and install.
# ---------------------------------------------------------------------------
outer() {
    local clean=0
    while [ $# -gt 0 ]; do
        case $1 in
            --clean) clean=1 ;;
            -h|--help) usage; exit 0 ;;
            *) xc_die "unrecognized argument: $1 (see --help)" ;;
        esac
        shift
    done
    xc_require_root scripts/demo.sh

    xc_step "Set-up"
    xc_setup
    local demo rc=0
    demo=$(mktemp -d /tmp/xcapi-demo.XXXXXX)
    mkdir "$demo/src"
    chown "$XCAPI_USER:" "$demo"
    xc_stage_tree "$demo/src"
    xc_info "demo dir: $demo"
    xc_step "Build and install"
    XC_BUILD_LOG=$demo/build.log xc_build_install "$demo/src"
    chown "$XCAPI_USER:" "$demo/build.log"

    xc_as_user bash "$demo/src/scripts/demo.sh" --inner "$demo" "$clean" || rc=$?
    [ $clean -eq 1 ] && rm -rf "$demo"
    return $rc
}

if [ "${1:-}" = --inner ]; then
    [ "$(id -un)" = "$XCAPI_USER" ] || xc_die "--inner is internal to scripts/demo.sh"
    inner "$2" "$3"
else
    outer "$@"
fi
