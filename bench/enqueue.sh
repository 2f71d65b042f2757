#!/usr/bin/env bash
# bench/enqueue.sh — what enqueueing costs the inserting transaction (issue 3).
#
#   sudo bench/enqueue.sh [--duration S] [--rounds N] [--no-build] [--keep]
#
#   --duration S   seconds per pgbench run (default 15)
#   --rounds N     rounds of every measurement (default 3; medians reported)
#   --no-build     use the installed xcapi.so instead of make && make install
#   --keep         keep the work directory in /tmp
#
# A throwaway cluster (Unix socket, port 55431) with xcapi preloaded and NO
# xcapi.credentials_file, so the worker sends nothing: it holds the pixel's
# rows, and with xcapi.naptime = 1h it does not wake to move them to the end
# of the pause either, except when that 5-minute pause ends (the worker's CPU
# time during each run is measured and shown).
# Table payments (id bigserial, email, amount numeric(12,2), currency,
# created_at).  Measured, each WITHOUT vs WITH
#   AFTER INSERT ... FOR EACH ROW EXECUTE FUNCTION xcapi_fire_trigger('o8z6j',
#   'tw-o8z6j-o8z2x', 'email=email', 'value=amount', 'currency=currency',
#   'conversion_id=id'):
#   (a) pgbench, single-row INSERT (random email and amount), 1 and 2
#       clients, synchronous_commit on and off, rounds interleaved;
#       median TPS and the with/without ratio (target: >= 0.85)
#   (b) one 100,000-row INSERT ... SELECT; median time, ratio (target <= 2.5)
#       and the added microseconds per row; the floor: the same 100,000
#       queued rows copied by INSERT ... SELECT into a table like the intake
#       (where new conversions go: no index); and the filing the worker
#       does later (its statement moving them into xcapi_conversions)
#   (c) SELECT count(xcapi_fire(...)) FROM generate_series(1, 100000):
#       microseconds per conversion
#   (d) backend memory (VmRSS / RssAnon every 0.2 s) during a 200,000-row
#       SELECT xcapi_fire(...) FROM generate_series(1, 200000)
# Tables are truncated and a CHECKPOINT taken before every measurement.
# Reports only: no pass/fail.  Not part of the test suite.

set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=15 ROUNDS=3 PORT=55431
while [ $# -gt 0 ]; do
    case $1 in
        --duration) DURATION=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        *) bench_option "$1" ;;
    esac
    shift
done

bench_begin enqueue python3-psycopg2

DATA=$BENCH_WORK/data
bench_cluster_init "$DATA" "$PORT" bench <<EOF
shared_preload_libraries = 'xcapi'
xcapi.database = 'bench'
# No xcapi.credentials_file: the worker holds every row and sends nothing.
# Nothing listens here, should it ever try.
xcapi.api_url = 'https://127.0.0.1:9'
# Commits for a paused pixel do not wake the worker; its safety-net wake-up
# would move the rows held meanwhile to the end of the pause (an UPDATE per
# row), work that is not the trigger's: an hour keeps it out of the runs.
xcapi.naptime = '1h'
EOF
bench_cluster_start "$DATA"
DSN="host=$BENCH_WORK port=$PORT user=$XCAPI_USER dbname=bench"

psqlb <<'EOF'
CREATE EXTENSION xcapi;
CREATE TABLE payments (
    id         bigserial PRIMARY KEY,
    email      text,
    amount     numeric(12,2),
    currency   text,
    created_at timestamptz DEFAULT now());
EOF

TRIGGER_SQL="CREATE TRIGGER payments_to_x AFTER INSERT ON payments FOR EACH ROW
    EXECUTE FUNCTION xcapi_fire_trigger('o8z6j', 'tw-o8z6j-o8z2x', 'email=email',
        'value=amount', 'currency=currency', 'conversion_id=id')"
set_trigger() {
    if [ "$1" = with ]; then
        psqlb -c "SET client_min_messages = warning" -c "DROP TRIGGER IF EXISTS payments_to_x ON payments" -c "$TRIGGER_SQL"
    else
        psqlb -c "SET client_min_messages = warning" -c "DROP TRIGGER IF EXISTS payments_to_x ON payments"
    fi
}
reset_tables() {
    psqlb -c "TRUNCATE payments, xcapi_conversions" -c "CHECKPOINT"
}
set_sync() {
    psqlb -c "ALTER SYSTEM SET synchronous_commit = $1"
    bench_cluster_reload "$DATA"
    sleep 0.3
    [ "$(psqlv -c 'SHOW synchronous_commit')" = "$1" ] || xc_die "synchronous_commit is not $1"
}

WPID=''
for _ in $(seq 1 50); do WPID=$(worker_pid); [ -n "$WPID" ] && break; sleep 0.2; done
[ -n "$WPID" ] || xc_die "no xcapi worker in pg_stat_activity (log: $BENCH_WORK/postgres.log)"

bench_header "xcapi enqueue benchmark (bench/enqueue.sh)"
printf '  cluster     %s, port %s, defaults + shared_preload_libraries=xcapi\n' "$DATA" "$PORT"
printf '  worker      pid %s; NO credentials file: the worker claims nothing to send and holds the rows\n' "$WPID"
printf '              (its CPU seconds during each run are shown to check that it stays idle)\n'
printf '  trigger     %s\n' "$(tr -s ' \n' ' ' <<<"$TRIGGER_SQL")"
printf '  xcapi.*     %s\n' "$(xcapi_settings)"

# ---------------------------------------------------------------------------
# (a) pgbench, single-row INSERT
# ---------------------------------------------------------------------------
cat >"$BENCH_WORK/insert.pgbench" <<'EOF'
\set u random(1, 1000000000)
\set cents random(100, 9999999)
INSERT INTO payments (email, amount, currency) VALUES ('user' || :u || '@example.com', :cents / 100.0, 'USD');
EOF
chmod 644 "$BENCH_WORK/insert.pgbench"

declare -A TPS WCPU ROWS
run_pgbench() {   # sync mode clients
    local out tps t0 t1 rows
    reset_tables
    t0=$(proc_cpu_ticks "$WPID")
    out=$("$PG_BINDIR/pgbench" -n -M prepared -f "$BENCH_WORK/insert.pgbench" \
        -c "$3" -j "$3" -T "$DURATION" "${PSQL_ARGS[@]}" 2>&1) ||
        { printf '%s\n' "$out" >&2; xc_die "pgbench failed"; }
    t1=$(proc_cpu_ticks "$WPID")
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' <<<"$out")
    [ -n "$tps" ] || { printf '%s\n' "$out" >&2; xc_die "no tps in pgbench output"; }
    rows=$(psqlv -c "SELECT count(*) FROM xcapi_conversions")
    TPS[$1,$2,$3]+="$tps "
    WCPU[$1,$2,$3]+="$(awk -v a="$t0" -v b="$t1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / h }') "
    ROWS[$1,$2,$3]+="$rows "
    printf '    sync=%-3s %-7s clients=%s  %9.1f tps  queued rows %7s  worker CPU %ss\n' \
        "$1" "$2" "$3" "$tps" "$rows" "$(awk -v a="$t0" -v b="$t1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / h }')"
}

xc_step "(a) pgbench single-row INSERT, ${DURATION}s per run, $ROUNDS rounds, interleaved"
for sync in on off; do
    set_sync "$sync"
    for ((r = 1; r <= ROUNDS; r++)); do
        if ((r % 2)); then order=(without with); else order=(with without); fi
        for mode in "${order[@]}"; do
            set_trigger "$mode"
            for c in 1 2; do run_pgbench "$sync" "$mode" "$c"; done
        done
    done
done
psqlb -c "ALTER SYSTEM RESET synchronous_commit"
bench_cluster_reload "$DATA"

# ---------------------------------------------------------------------------
# (b) one 100,000-row INSERT ... SELECT; (c) xcapi_fire over 100,000 rows
# ---------------------------------------------------------------------------
BULK_SQL="INSERT INTO payments (email, amount, currency)
  SELECT 'user' || g || '@example.com', (g % 100000) / 100.0, 'USD' FROM generate_series(1, 100000) AS g"
FIRE_SQL="SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'c' || g,
  email => 'u' || g || '@example.com', value => g % 1000)) FROM generate_series(1, 100000) AS g"
time_sql() {   # SQL -> milliseconds
    local ms
    ms=$(psqlb -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -n 1)
    [ -n "$ms" ] || xc_die "no timing for: $1"
    echo "$ms"
}
declare -A BULK
# The SQL form of the worker's filing (xcapi_outbox_file_intake in
# src/outbox.c, used when xcapi_conversions has a trigger, rule or
# constraint of someone else's; otherwise the worker does the same without
# the executor, which bench/drain.sh measures): 10 chunks of 10,000 rows,
# total milliseconds.
FILE_SQL="WITH moved AS (DELETE FROM ONLY xcapi_conversions_intake
  WHERE ctid = ANY (ARRAY(SELECT ctid FROM ONLY xcapi_conversions_intake LIMIT 10000)) RETURNING *)
  INSERT INTO xcapi_conversions SELECT * FROM moved"
file_intake() {
    local args=(-c '\timing on') i
    for i in $(seq 1 10); do args+=(-c "$FILE_SQL"); done
    psqlb "${args[@]}" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' |
        awk '{ t += $1 } END { printf "%.1f", t }'
}
# Same columns, indexes (none), defaults, checks and fillfactor as the
# intake, where new conversions are written; no xcapi code.
psqlb <<'EOF'
CREATE TABLE outbox_floor (LIKE xcapi_conversions_intake INCLUDING ALL);
DO $$
DECLARE opts text[] := (SELECT reloptions FROM pg_class WHERE oid = 'xcapi_conversions_intake'::regclass);
BEGIN
    IF opts IS NOT NULL THEN
        EXECUTE format('ALTER TABLE outbox_floor SET (%s)', array_to_string(opts, ', '));
    END IF;
END $$;
EOF
xc_step "(b) 100,000-row INSERT ... SELECT, $ROUNDS rounds, interleaved; (c) xcapi_fire x 100,000"
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order=(without with); else order=(with without); fi
    for mode in "${order[@]}"; do
        set_trigger "$mode"
        reset_tables
        ms=$(time_sql "$BULK_SQL")
        BULK[$mode]+="$ms "
        printf '    round %d  %-7s trigger  %9.1f ms  queued rows %s\n' "$r" "$mode" "$ms" \
            "$(psqlv -c 'SELECT count(*) FROM xcapi_conversions')"
        if [ "$mode" = with ]; then
            # the floor: the same 100,000 queued rows written by plain SQL
            psqlb -c "TRUNCATE outbox_floor" -c "CHECKPOINT"
            ms=$(time_sql "INSERT INTO outbox_floor SELECT * FROM xcapi_conversions")
            BULK[floor]+="$ms "
            printf '    round %d  floor: INSERT INTO outbox_floor SELECT * FROM xcapi_conversions  %9.1f ms\n' "$r" "$ms"
            ms=$(time_sql "SELECT count(*) FROM xcapi_conversions")
            BULK[read]+="$ms "
            # what the worker does later, off the inserting transaction: its
            # filing statement (src/outbox.c), 10 chunks of 10,000 rows
            ms=$(file_intake)
            BULK[file]+="$ms "
            printf '    round %d  filing 100,000 rows (10 x the SQL filing statement)  %9.1f ms  left in the intake %s\n' "$r" "$ms" \
                "$(psqlv -c 'SELECT count(*) FROM ONLY xcapi_conversions_intake')"
        fi
    done
    set_trigger without
    reset_tables
    ms=$(time_sql "$FIRE_SQL")
    BULK[fire]+="$ms "
    printf '    round %d  xcapi_fire x 100000  %9.1f ms  queued rows %s\n' "$r" "$ms" \
        "$(psqlv -c 'SELECT count(*) FROM xcapi_conversions')"
done

# ---------------------------------------------------------------------------
# (d) backend memory during a 200,000-row backfill in one statement
# ---------------------------------------------------------------------------
xc_step "(d) backend memory during 200,000-row statements (sampled every 0.2 s)"
MEM_BASE_SQL="INSERT INTO payments (email, amount, currency)
  SELECT 'user' || g || '@example.com', (g % 100000) / 100.0, 'USD' FROM generate_series(1, 200000) AS g RETURNING id"
MEM_FIRE_SQL="SELECT xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'm' || g,
  email => 'u' || g || '@example.com', value => g % 1000) FROM generate_series(1, 200000) AS g"
declare -A MEM
mem_run() {   # label trigger sql
    set_trigger "$2"
    reset_tables
    MEM[$1]=$("$PYTHON" "$BENCH_DIR/rss_during.py" --dsn "$DSN" --label "$1" "$3") ||
        xc_die "rss_during.py failed"
    printf '    %s\n' "${MEM[$1]}"
}
mem_run baseline without "$MEM_BASE_SQL"
mem_run fire without "$MEM_FIRE_SQL"
mem_run trigger with "${MEM_BASE_SQL% RETURNING id}"
set_trigger without

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
printf '\n%s== (a) single-row INSERT via pgbench -M prepared, %s s per run, median of %s rounds ==%s\n' \
    "$XC_BOLD" "$DURATION" "$ROUNDS" "$XC_RESET"
printf '%-28s %-8s %12s %12s %13s %9s %22s\n' "synchronous_commit" clients "without tps" "with tps" \
    "with/without" "TPS cost" "worker CPU % without/with"
for sync in on off; do
    for c in 1 2; do
        # shellcheck disable=SC2086
        a=$(median ${TPS[$sync,without,$c]}) b=$(median ${TPS[$sync,with,$c]})
        # shellcheck disable=SC2086
        wa=$(median ${WCPU[$sync,without,$c]}) wb=$(median ${WCPU[$sync,with,$c]})
        label="on (default)"
        [ "$sync" = off ] && label="off (no commit fsync wait)"
        printf '%-28s %-8s %12.1f %12.1f %13s %8s%% %22s\n' "$label" "$c" "$a" "$b" "$(ratio "$b" "$a")" \
            "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.1f", (1 - b / a) * 100 }')" \
            "$(awk -v a="$wa" -v b="$wb" -v d="$DURATION" 'BEGIN { printf "%.0f / %.0f", 100 * a / d, 100 * b / d }')"
    done
done
printf '  all runs (tps): '
for k in "${!TPS[@]}"; do printf '%s=[%s] ' "$k" "${TPS[$k]% }"; done | tr ' ' ' '
printf '\n  worker CPU s per run: '
for k in "${!WCPU[@]}"; do printf '%s=[%s] ' "$k" "${WCPU[$k]% }"; done
printf '\n  (worker CPU %% = CPU seconds of the xcapi worker / run length; it has nothing to send, so it should be ~0)'
printf '\n  target: trigger costs <= 15%% TPS (with/without >= 0.85)\n'

# shellcheck disable=SC2086
bw=$(median ${BULK[without]}) bt=$(median ${BULK[with]}) bf=$(median ${BULK[fire]})
printf '\n%s== (b) one 100,000-row INSERT ... SELECT, median of %s rounds ==%s\n' "$XC_BOLD" "$ROUNDS" "$XC_RESET"
printf '%-34s %12s %12s %10s\n' "" "ms" "us/row" "ratio"
printf '%-34s %12.1f %12.2f %10s\n' "without trigger (baseline)" "$bw" "$(awk -v m="$bw" 'BEGIN { print m * 10 / 1000 }')" "1.000"
printf '%-34s %12.1f %12.2f %10s\n' "with xcapi_fire_trigger" "$bt" "$(awk -v m="$bt" 'BEGIN { print m * 10 / 1000 }')" "$(ratio "$bt" "$bw")"
printf '  added by the trigger: %s us per row  (target: with <= 2.5 x without)\n' \
    "$(awk -v a="$bt" -v b="$bw" 'BEGIN { printf "%.2f", (a - b) * 1000 / 100000 }')"
# shellcheck disable=SC2086
bfl=$(median ${BULK[floor]}) brd=$(median ${BULK[read]})
printf '%-34s %12.1f %12.2f %10s\n' "floor: the same rows by plain SQL" "$bfl" "$(awk -v m="$bfl" 'BEGIN { print m * 10 / 1000 }')" \
    "$(awk -v a="$bfl" -v b="$bw" 'BEGIN { printf "%.3f", (a + b) / b }')"
printf '  floor = INSERT INTO outbox_floor SELECT * FROM xcapi_conversions right after a "with" run:\n'
printf '  writing those 100,000 queued rows into a table like the intake (same columns, no index,\n'
printf '  fillfactor 100) with no xcapi code; its ratio is (baseline + floor) / baseline: what storing\n'
printf '  one such row per payment costs at least (it includes reading the rows back: a count(*) over\n'
printf '  them takes %s ms)\n' "$brd"
# shellcheck disable=SC2086
bfi=$(median ${BULK[file]})
printf '%-34s %12.1f %12.2f\n' "later, in the worker: filing (SQL)" "$bfi" "$(awk -v m="$bfi" 'BEGIN { print m * 10 / 1000 }')"
printf '  filing = moving the rows from the intake into xcapi_conversions (its primary key and due\n'
printf '  index), 10 chunks of 10,000, with the SQL form of the worker'"'"'s filing run by hand: work done\n'
printf '  after the commit, by the worker, not by the inserting transaction (the worker'"'"'s own path,\n'
printf '  without the executor, costs less: see bench/drain.sh)\n'
printf '  all runs (ms): without [%s]  with [%s]  floor [%s]  filing [%s]\n' "${BULK[without]% }" "${BULK[with]% }" \
    "${BULK[floor]% }" "${BULK[file]% }"

printf '\n%s== (c) SELECT count(xcapi_fire(...)) FROM generate_series(1, 100000), median of %s rounds ==%s\n' \
    "$XC_BOLD" "$ROUNDS" "$XC_RESET"
printf '%-34s %12s %12s %10s\n' "" "ms" "us/row" "vs (b) baseline"
printf '%-34s %12.1f %12.2f %10s\n' "xcapi_fire x 100,000" "$bf" "$(awk -v m="$bf" 'BEGIN { print m * 10 / 1000 }')" "$(ratio "$bf" "$bw")"
printf '  all runs (ms): [%s]\n' "${BULK[fire]% }"

printf '\n%s== (d) backend memory during one 200,000-row statement (kB; start = before, end = after commit) ==%s\n' \
    "$XC_BOLD" "$XC_RESET"
"$PYTHON" - "${MEM[baseline]}" "${MEM[fire]}" "${MEM[trigger]}" <<'EOF'
import json, sys
names = {"baseline": "INSERT 200k RETURNING id, no trigger (baseline)",
         "fire": "SELECT xcapi_fire(...) x 200k",
         "trigger": "INSERT 200k with xcapi trigger"}
print("%-48s %7s %8s | %8s %8s %8s | %8s %8s %8s | %8s" % (
    "statement", "s", "samples", "RSS start", "peak", "end",
    "Anon start", "peak", "end", "Shmem peak"))
for raw in sys.argv[1:]:
    r = json.loads(raw)
    v, a, s = r["VmRSS"], r["RssAnon"], r["RssShmem"]
    print("%-48s %7.2f %8d | %8d %8d %8d | %8d %8d %8d | %8d" % (
        names[r["label"]], r["seconds"], r["samples"], v["start"], v["peak"], v["end"],
        a["start"], a["peak"], a["end"], s["peak"]))
rs = {json.loads(x)["label"]: json.loads(x) for x in sys.argv[1:]}
b, f = rs["baseline"]["RssAnon"], rs["fire"]["RssAnon"]
print("  private memory (RssAnon) growth start->peak: baseline %+d kB, xcapi_fire %+d kB"
      % (b["peak"] - b["start"], f["peak"] - f["start"]))
print("  RssShmem is shared_buffers pages the backend touched (128MB default), not backend memory.")
EOF
printf '\n  report saved to %s\n' "$REPORT"
