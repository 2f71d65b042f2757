#!/usr/bin/env bash
# bench/leakcheck.sh — valgrind memcheck of the xcapi worker during a short
# drain (issue 5, item 3).
#
#   sudo bench/leakcheck.sh [--rows N] [--fault-rows N] [--batch-size N]
#                           [--no-build] [--keep]
#
#   --rows N         conversions of the clean drain (default 20000)
#   --fault-rows N   conversions sent afterwards with faults injected in the
#                    mock (10 % HTTP 503, 3 % dropped connections, 2 poisoned
#                    conversions that X-like 400s make the worker split down
#                    to), to cover the retry and split paths (default 2000;
#                    0 to skip)
#   --batch-size N   xcapi.batch_size (default 100, so the drain makes
#                    more requests: rows / N of them)
#   --no-build       use the installed xcapi.so instead of make && make install
#   --keep           keep the work directory in /tmp (valgrind logs)
#
# Half the clean drain's conversions are enqueued by xcapi_fire, half by an
# AFTER ROW xcapi_fire_trigger (whose rows a backend writes per statement).
# The postmaster runs under valgrind (memcheck, --leak-check=full,
# --trace-children=yes, suppressions from bench/valgrind.supp); the worker
# and every other child is a forked copy and is checked too, each with its
# own log.  The sink is t/mock_x.py (HTTPS, OAuth verified), with
# xcapi.retry_base = 10 ms and xcapi.retry_max = 200 ms so retries are quick.
# After the drain the cluster is stopped (fast) so each process exits and
# valgrind writes its leak report.  Printed: the LEAK SUMMARY of every
# process by type (the other PostgreSQL processes are the baseline: their
# memory is in memory contexts, "still reachable"), and for the worker every
# "definitely" / "indirectly lost" record, marked when a frame is in
# xcapi.so, libcurl, libssl or libcrypto.  Reports only: no pass/fail.

set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS=20000 FAULT_ROWS=2000 BATCH=100 PORT=55434
while [ $# -gt 0 ]; do
    case $1 in
        --rows) ROWS=$2; shift ;;
        --fault-rows) FAULT_ROWS=$2; shift ;;
        --batch-size) BATCH=$2; shift ;;
        *) bench_option "$1" ;;
    esac
    shift
done

bench_begin leakcheck valgrind python3-oauthlib openssl
T_START=$EPOCHREALTIME

# -- the mock ----------------------------------------------------------------
mkdir -p "$BENCH_WORK/vg"
cp "$BENCH_DIR/valgrind.supp" "$BENCH_WORK/valgrind.supp"
chown -R "$XCAPI_USER:" "$BENCH_WORK/vg" "$BENCH_WORK/valgrind.supp"
bench_start_mock

# -- the cluster, under valgrind ---------------------------------------------------
bench_write_credentials
DATA=$BENCH_WORK/data
bench_cluster_init "$DATA" "$PORT" bench <<EOF
shared_preload_libraries = 'xcapi'
xcapi.database = 'bench'
xcapi.api_url = 'https://127.0.0.1:$MOCK_PORT'
xcapi.ca_file = '$MOCK/cert.pem'
xcapi.credentials_file = '$CREDS'
xcapi.batch_size = $BATCH
xcapi.retry_base = 10
xcapi.retry_max = 200
# fewer processes and less noise under valgrind
autovacuum = off
shared_buffers = 32MB
EOF
BENCH_CLUSTERS+=("$DATA")
# shellcheck disable=SC2054  # the commas are inside option values
VG_OPTS=(--tool=memcheck --trace-children=yes --leak-check=full
         --show-leak-kinds=definite,indirect,possible --errors-for-leak-kinds=definite
         --num-callers=40 --error-limit=no --read-var-info=no --track-origins=no
         --suppressions=/usr/libexec/valgrind/default.supp
         --suppressions="$BENCH_WORK/valgrind.supp"
         --log-file="$BENCH_WORK/vg/%p.log")
xc_step "Start the postmaster under valgrind"
# shellcheck disable=SC2016  # expanded by the inner sh
xc_as_user sh -c 'cd "$1"; shift; exec "$@"' sh "$BENCH_WORK" \
    valgrind "${VG_OPTS[@]}" postgres -D "$DATA" >"$BENCH_WORK/postgres.log" 2>&1 &
for i in $(seq 1 600); do
    psqlv -c "SELECT 1" >/dev/null 2>&1 && break
    [ "$i" = 600 ] && { tail -n 30 "$BENCH_WORK/postgres.log" >&2; xc_die "postmaster under valgrind did not start"; }
    sleep 0.2
done
PM_PID=$(head -n 1 "$DATA/postmaster.pid")
echo "$PM_PID postmaster" >>"$BENCH_WORK/pids.txt"
xc_info "up after $(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"
psqlb -c "CREATE EXTENSION xcapi"
WPID=''
for _ in $(seq 1 300); do WPID=$(worker_pid); [ -n "$WPID" ] && break; sleep 0.2; done
[ -n "$WPID" ] || xc_die "no xcapi worker (log: $BENCH_WORK/postgres.log)"
snapshot_types() {
    psqlv -F ' ' -c "SELECT pid, replace(backend_type, ' ', '_') FROM pg_stat_activity" >>"$BENCH_WORK/pids.txt" || true
}
snapshot_types

wait_done() {   # total timeout_s
    local want=$1 t=$2 n=0
    for ((i = 0; i < t * 2; i++)); do
        n=$(psqlv -c "SELECT count(*) FROM xcapi_conversions WHERE status IN ('sent', 'dead')")
        ((n >= want)) && break
        sleep 0.5
    done
    echo "$n"
}

bench_header "xcapi leak check (bench/leakcheck.sh)"
printf '  valgrind    %s; postmaster and all children; logs %s/vg/<pid>.log\n' "$(valgrind --version)" "$BENCH_WORK"
printf '  sink        t/mock_x.py https://127.0.0.1:%s; xcapi.batch_size = %s\n' "$MOCK_PORT" "$BATCH"
printf '  worker      pid %s\n' "$WPID"
printf '  xcapi.*     %s\n' "$(xcapi_settings)"

xc_step "Clean drain: $ROWS conversions (half by xcapi_fire, half by a trigger)"
T0=$EPOCHREALTIME
HALF=$((ROWS / 2))
psqlb -c "SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'c' || g,
    email => 'u' || g || '@example.com', value => g % 1000)) FROM generate_series(1, $HALF) AS g" >/dev/null
# the trigger's rows are written per statement (several batches here), and
# a rolled-back savepoint drops its own
psqlb >/dev/null <<EOF
CREATE TABLE orders (id bigint PRIMARY KEY, email text, amount numeric);
CREATE TRIGGER orders_to_x AFTER INSERT ON orders FOR EACH ROW
    EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'tw-o8z6j-o8z2x', 'email=email', 'value=amount');
BEGIN;
INSERT INTO orders SELECT g, 't' || g || '@example.com', g % 1000 FROM generate_series(1, $((ROWS - HALF))) AS g;
SAVEPOINT s;
INSERT INTO orders SELECT -g, 'r' || g || '@example.com', 1 FROM generate_series(1, 1500) AS g;
ROLLBACK TO SAVEPOINT s;
COMMIT;
EOF
n=$(wait_done "$ROWS" 400)
snapshot_types
xc_info "$n of $ROWS sent or dead after $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"

if [ "$FAULT_ROWS" -gt 0 ]; then
    xc_step "Drain with faults: $FAULT_ROWS conversions (503 10 %, drops 3 %, 2 poisoned)"
    cat >"$MOCK/faults.tmp" <<EOF
{"status_rate": {"503": 0.1}, "drop_rate": 0.03,
 "poison_conversion_ids": ["f7", "f$((FAULT_ROWS / 2 + 3))"]}
EOF
    chown "$XCAPI_USER:" "$MOCK/faults.tmp"
    mv "$MOCK/faults.tmp" "$MOCK/faults.json"
    T0=$EPOCHREALTIME
    psqlb -c "SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'f' || g,
        email => 'f' || g || '@example.com', value => g % 1000)) FROM generate_series(1, $FAULT_ROWS) AS g" >/dev/null
    n=$(wait_done "$((ROWS + FAULT_ROWS))" 300)
    xc_info "$n of $((ROWS + FAULT_ROWS)) sent or dead after $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"
fi
snapshot_types
WPID_END=$(worker_pid)
STATUSES=$(psqlv -c "SELECT string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM xcapi_conversions GROUP BY 1 ORDER BY 1) s")
REQS=$(wc -l <"$MOCK/requests.jsonl")
REQ_ST=$("$PYTHON" -c 'import collections, json, sys
c = collections.Counter(str(json.loads(l).get("status")) for l in open(sys.argv[1]) if l.strip())
print(", ".join("%s: %d" % kv for kv in sorted(c.items())))' "$MOCK/requests.jsonl")

xc_step "Stop the cluster (valgrind writes the leak reports)"
xc_as_user pg_ctl -D "$DATA" -m fast -w -t 600 stop >/dev/null
# valgrind writes each report as its process exits: wait for the worker's
# and the postmaster's, then until no further report appears for 2 s
prev=-1
for _ in $(seq 1 300); do
    n=$(grep -l 'ERROR SUMMARY' "$BENCH_WORK"/vg/*.log 2>/dev/null | wc -l)
    if grep -q 'ERROR SUMMARY' "$BENCH_WORK/vg/$WPID_END.log" "$BENCH_WORK/vg/$PM_PID.log" 2>/dev/null &&
       [ "$(grep -l 'ERROR SUMMARY' "$BENCH_WORK/vg/$WPID_END.log" "$BENCH_WORK/vg/$PM_PID.log" | wc -l)" = 2 ] &&
       [ "$n" = "$prev" ]; then
        break
    fi
    prev=$n
    sleep 1
done

# -- report -------------------------------------------------------------------------
printf '\n%s== valgrind leak summary per process (bytes) ==%s\n' "$XC_BOLD" "$XC_RESET"
printf '  outbox: %s; mock saw %s requests (%s)\n' "$STATUSES" "$REQS" "$REQ_ST"
[ "$WPID" = "$WPID_END" ] || printf '  note: the worker restarted during the run (pid %s, then %s)\n' "$WPID" "$WPID_END"
"$PYTHON" "$BENCH_DIR/vg_report.py" "$BENCH_WORK/vg" "$BENCH_WORK/pids.txt" "$WPID,$WPID_END" "$PM_PID" "$XC_REPO/src"
printf '\n  The other processes are the baseline: every child inherits the postmaster'"'"'s start-up losses at\n'
printf '  fork; PostgreSQL frees nothing at exit, its memory contexts show as "still reachable".\n'
printf '  total time %s s\n' "$(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')"
printf '\n  report saved to %s\n' "$REPORT"
