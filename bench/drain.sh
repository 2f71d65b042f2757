#!/usr/bin/env bash
# bench/drain.sh — how fast the worker drains a backlog (issue 5, items 1 and 3).
#
#   sudo bench/drain.sh [--rows N] [--inflight "4 8"] [--timeout S]
#                       [--nginx-workers N] [--profile] [--no-build] [--keep]
#
#   --rows N           conversions per drain (default 1000000, enqueued in
#                      chunks of 100,000)
#   --inflight LIST    xcapi.max_inflight values, one drain each (default "4 8";
#                      the first is the baseline of the ratios)
#   --timeout S        give up on a drain after S seconds (default 240) and
#                      report what was sent by then
#   --nginx-workers N  nginx worker processes (default 1: the machine has 2
#                      cores, one is left to the xcapi worker)
#   --profile          also sample the xcapi worker with perf (99 Hz, call
#                      graphs) and pg_stat_statements (track = all) during
#                      each drain, and print where its time went
#   --no-build         use the installed xcapi.so instead of make && make install
#   --keep             keep the work directory in /tmp
#
# The sink is nginx (Debian's nginx-light) on https://127.0.0.1:<free port>,
# run as the OS user xcapi with its own prefix directory and a self-signed
# certificate (CN and SAN 127.0.0.1, trusted through xcapi.ca_file); it
# keeps connections alive and answers every POST like X does:
#   200 {"request":{"params":{"account_id":"bench1"}},"data":{"conversions_processed":500,"debug_id":"x"}}
# and logs "$msec $request_length $status $connection $connection_requests".
#
# For each max_inflight value: a fresh cluster (Unix socket, port 55432)
# with xcapi preloaded, xcapi.rate_limit_events = 0 and
# xcapi.rate_limit_requests = 0 (no pacing) and xcapi.credentials_file
# naming a file that does not exist yet, so the backlog builds without
# sending.  N conversions are queued with xcapi_fire; then the credentials
# file is written (mode 0600, owner xcapi) and the server reloaded, which
# starts the drain.  Every 0.5 s: conversions sent (xcapi_worker_state(),
# shared memory, cheap; the count of 'sent' rows is checked with
# count(*) at the end) and the worker's VmRSS / RssAnon from /proc.
# Reported: seconds, conversions/s overall and at steady state (10 % to
# 90 % sent), requests and bytes seen by nginx, connections used, worker
# RSS at 100k sent / at the end / max, CPU used by the worker and by nginx,
# table and index sizes after the drain.  Target: >= 50,000 conversions/s.
# Reports only: no pass/fail.  Not part of the test suite.

set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS=1000000 INFLIGHT_LIST="4 8" TIMEOUT=240 NGINX_WORKERS=1 PROFILE=0 PORT=55432 CHUNK=100000
while [ $# -gt 0 ]; do
    case $1 in
        --rows) ROWS=$2; shift ;;
        --inflight) INFLIGHT_LIST=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        --nginx-workers) NGINX_WORKERS=$2; shift ;;
        --profile) PROFILE=1 ;;
        *) bench_option "$1" ;;
    esac
    shift
done
[ "$ROWS" -ge 1000 ] || xc_die "--rows must be at least 1000"

pkgs=(nginx-light openssl curl iproute2)
[ "$PROFILE" = 1 ] && pkgs+=(linux-perf)
bench_begin drain "${pkgs[@]}"

free_port() {   # a TCP port nothing listens on, from 58443 up
    local p
    for ((p = 58443; p < 58600; p++)); do
        ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
    xc_die "no free port found"
}

# ---------------------------------------------------------------------------
# nginx: the sink
# ---------------------------------------------------------------------------
NG=$BENCH_WORK/nginx
NGINX_PORT=$(free_port)
mkdir -p "$NG/tmp" "$NG/logs"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$NG/key.pem" -out "$NG/cert.pem" \
    >"$NG/openssl.log" 2>&1 || { cat "$NG/openssl.log" >&2; xc_die "openssl failed"; }
cat >"$NG/nginx.conf" <<EOF
# bench/drain.sh: a fast stand-in for X's conversions endpoint
worker_processes $NGINX_WORKERS;
daemon on;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
events { worker_connections 1024; }
http {
    client_body_temp_path $NG/tmp/body;
    proxy_temp_path $NG/tmp/proxy;
    fastcgi_temp_path $NG/tmp/fastcgi;
    uwsgi_temp_path $NG/tmp/uwsgi;
    scgi_temp_path $NG/tmp/scgi;
    log_format bench '\$msec \$request_length \$content_length \$status \$connection \$connection_requests';
    access_log $NG/logs/access.log bench;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_max_body_size 10m;
    client_body_buffer_size 1m;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        ssl_certificate $NG/cert.pem;
        ssl_certificate_key $NG/key.pem;
        default_type application/json;
        location / {
            return 200 '{"request":{"params":{"account_id":"bench1"}},"data":{"conversions_processed":500,"debug_id":"x"}}';
        }
    }
}
EOF
chown -R "$XCAPI_USER:" "$NG"
chmod 600 "$NG/key.pem"
BENCH_PIDFILES+=("$NG/nginx.pid")
xc_as_user /usr/sbin/nginx -p "$NG" -e "$NG/logs/error.log" -c "$NG/nginx.conf" ||
    { cat "$NG/logs/error.log" >&2; xc_die "nginx did not start"; }
for _ in $(seq 1 50); do [ -s "$NG/nginx.pid" ] && break; sleep 0.1; done
NGINX_PID=$(tr -dc 0-9 <"$NG/nginx.pid")
curl -sS --cacert "$NG/cert.pem" -X POST -H 'Content-Type: application/json' \
    -d '{"conversions":[]}' "https://127.0.0.1:$NGINX_PORT/12/measurement/conversions/o8z6j" >/dev/null ||
    xc_die "nginx does not answer on https://127.0.0.1:$NGINX_PORT"
nginx_cpu_ticks() {   # master + workers
    local t=0 p
    for p in $NGINX_PID $(pgrep -P "$NGINX_PID"); do t=$((t + $(proc_cpu_ticks "$p"))); done
    echo $t
}
nginx_log_lines() { wc -l <"$NG/logs/access.log"; }

bench_header "xcapi drain benchmark (bench/drain.sh)"
printf '  sink        nginx %s (%s worker process(es)), https://127.0.0.1:%s, keep-alive, TLS (self-signed, xcapi.ca_file)\n' \
    "$(/usr/sbin/nginx -v 2>&1 | sed 's/.*nginx\///')" "$NGINX_WORKERS" "$NGINX_PORT"
printf '  cluster     fresh per run, defaults + xcapi.rate_limit_events = 0, xcapi.rate_limit_requests = 0\n'
printf '  backlog     %s conversions via xcapi_fire in chunks of %s, credentials file absent; then written + reload\n' "$ROWS" "$CHUNK"

# ---------------------------------------------------------------------------
# one drain
# ---------------------------------------------------------------------------
declare -A R   # results: R[inflight,key]
drain_run() {
    local inflight=$1
    local dir=$BENCH_WORK/run-$inflight
    local data=$dir/data creds=$dir/credentials.conf
    mkdir -p "$dir"
    chown "$XCAPI_USER:" "$dir"
    chmod 755 "$dir"
    local preload="'xcapi'" extra=''
    if [ "$PROFILE" = 1 ]; then
        preload="'xcapi,pg_stat_statements'"
        extra="pg_stat_statements.track = 'all'"
    fi
    bench_cluster_init "$data" "$PORT" bench <<EOF
shared_preload_libraries = $preload
xcapi.database = 'bench'
xcapi.api_url = 'https://127.0.0.1:$NGINX_PORT'
xcapi.ca_file = '$NG/cert.pem'
xcapi.credentials_file = '$creds'
xcapi.rate_limit_events = 0
xcapi.rate_limit_requests = 0
xcapi.max_inflight = $inflight
$extra
EOF
    bench_cluster_start "$data" "$dir/postgres.log"
    # the build the worker runs, to tell later whether xcapi.so was replaced
    # under it (perf would then resolve its frames against the wrong file)
    R[$inflight,so_id]=$(readelf -n "$PG_PKGLIBDIR/xcapi.so" 2>/dev/null | awk '/Build ID/ { print $3 }')
    if [ "$PROFILE" = 1 ]; then
        perf buildid-cache --add "$PG_PKGLIBDIR/xcapi.so" >/dev/null 2>&1 || true
    fi
    psqlb -c "CREATE EXTENSION xcapi"
    [ "$PROFILE" = 1 ] && psqlb -c "CREATE EXTENSION pg_stat_statements"
    local have_state
    have_state=$(psqlv -c "SELECT count(*) FROM pg_proc WHERE proname = 'xcapi_worker_state'")
    local wpid=''
    for _ in $(seq 1 50); do wpid=$(worker_pid); [ -n "$wpid" ] && break; sleep 0.2; done
    [ -n "$wpid" ] || xc_die "no xcapi worker (log: $dir/postgres.log)"

    [ "$PROFILE" = 1 ] && psqlb -c "SELECT pg_stat_statements_reset()" >/dev/null
    xc_step "max_inflight = $inflight: queue $ROWS conversions (credentials file absent)"
    local s e t0 t1
    t0=$EPOCHREALTIME
    for ((s = 1; s <= ROWS; s += CHUNK)); do
        e=$((s + CHUNK - 1)); ((e > ROWS)) && e=$ROWS
        psqlb -c "SELECT count(xcapi_fire('o8z6j', 'tw-o8z6j-o8z2x', conversion_id => 'c' || g,
            email => 'u' || g || '@example.com', value => g % 1000)) FROM generate_series($s, $e) AS g" >/dev/null
    done
    t1=$EPOCHREALTIME
    R[$inflight,enqueue_s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    psqlb -c "CHECKPOINT"
    xc_info "queued in ${R[$inflight,enqueue_s]} s; $(psqlv -c "SELECT string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM xcapi_conversions GROUP BY 1 ORDER BY 1) s")"
    # the table with every row queued: the baseline for bloat from status changes
    R[$inflight,total_queued]=$(psqlv -c "SELECT pg_size_pretty(pg_total_relation_size('xcapi_conversions'))")
    # new conversions land in the intake; the worker files them into the outbox
    R[$inflight,intake_queued]=$(psqlv -c "SELECT pg_size_pretty(pg_total_relation_size('xcapi_conversions_intake'))
        || ', ' || (SELECT count(*) FROM ONLY xcapi_conversions_intake) || ' rows'")
    # rows moved out of the due range while the pixel was paused (deferred)
    R[$inflight,deferred]=$(psqlv -c "SELECT count(*) FROM xcapi_conversions WHERE next_attempt_at > now() + interval '10 s'")

    # -- start the drain -------------------------------------------------------
    local lines0 wcpu0 ncpu0 stat0 poll_sql samples=$dir/samples.txt
    lines0=$(nginx_log_lines)
    wcpu0=$(proc_cpu_ticks "$wpid") ncpu0=$(nginx_cpu_ticks)
    stat0=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8, $5 + $6 }' /proc/stat)
    if [ "$have_state" = 1 ]; then
        poll_sql="SELECT conversions_sent FROM xcapi_worker_state()"
        R[$inflight,poll]="xcapi_worker_state().conversions_sent"
    else
        poll_sql="SELECT count(*) FILTER (WHERE status = 'sent') FROM xcapi_conversions"
        R[$inflight,poll]="count(*) FILTER (WHERE status = 'sent')"
    fi
    local sent0
    sent0=$(psqlv -c "$poll_sql")
    local lsn0
    lsn0=$(psqlv -c "SELECT pg_current_wal_lsn()")
    xc_step "max_inflight = $inflight: write the credentials file and reload: drain"
    xc_write_credentials "$creds"    # nginx does not check them
    chown "$XCAPI_USER:" "$creds"
    local perf_pid=''
    t0=$EPOCHREALTIME
    bench_cluster_reload "$data"
    if [ "$PROFILE" = 1 ]; then
        perf record -F 99 --buildid-mmap --call-graph dwarf,16384 -p "$wpid" -o "$dir/worker.perf" \
            >"$dir/perf-record.log" 2>&1 &
        perf_pid=$!
        BENCH_PIDS+=("$perf_pid")
    fi
    : >"$samples"
    local now sent rss anon done_rows=0 last_print=0 el prev=-1 stalled_since='' due
    R[$inflight,held]=''
    while :; do
        now=$EPOCHREALTIME
        sent=$(psqlv -c "$poll_sql")
        sent=$((sent - sent0))
        rss=$(proc_kb "$wpid" VmRSS) anon=$(proc_kb "$wpid" RssAnon)
        el=$(awk -v a="$t0" -v b="$now" 'BEGIN { printf "%.3f", b - a }')
        echo "$el $sent ${rss:-0} ${anon:-0}" >>"$samples"
        if ((sent >= ROWS)); then
            done_rows=$(psqlv -c "SELECT count(*) FILTER (WHERE status = 'sent') FROM xcapi_conversions")
            ((done_rows >= ROWS)) && break
        fi
        # No progress for 3 s and nothing left that is due soon: the rest is
        # held back (e.g. until a pause ends).  Say so instead of waiting.
        if ((sent != prev)); then
            prev=$sent stalled_since=$el
        elif awk -v e="$el" -v s="$stalled_since" 'BEGIN { exit !(e - s >= 3) }'; then
            due=$(psqlv -c "SELECT count(*) FROM xcapi_conversions WHERE status IN ('queued', 'sending')
                              AND next_attempt_at <= now() + interval '10 s'")
            if [ "$due" = 0 ]; then
                done_rows=$(psqlv -c "SELECT count(*) FILTER (WHERE status = 'sent') FROM xcapi_conversions")
                R[$inflight,held]=$(psqlv -c "SELECT string_agg(format('%s rows %s, last_error %L, last_http_status %s, due in %s s',
                        n, status, last_error, coalesce(last_http_status::text, 'NULL'), due_s), '; ')
                    FROM (SELECT status, last_error, last_http_status, count(*) n,
                                 round(extract(epoch FROM min(next_attempt_at) - now())) due_s
                            FROM xcapi_conversions WHERE status <> 'sent' GROUP BY 1, 2, 3) s")
                xc_warn "drain stalled with $((ROWS - done_rows)) rows held back: ${R[$inflight,held]}"
                break
            fi
        fi
        if awk -v e="$el" -v t="$TIMEOUT" 'BEGIN { exit !(e > t) }'; then
            xc_warn "timeout after $TIMEOUT s: $sent of $ROWS sent"
            done_rows=$(psqlv -c "SELECT count(*) FILTER (WHERE status = 'sent') FROM xcapi_conversions")
            break
        fi
        if awk -v e="$el" -v l="$last_print" 'BEGIN { exit !(e - l >= 5) }'; then
            printf '    %6.1f s  %8d sent  worker RSS %6d kB (anon %6d kB)\n' "$el" "$sent" "${rss:-0}" "${anon:-0}"
            last_print=$el
        fi
        sleep 0.5
    done
    t1=$EPOCHREALTIME
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
    fi
    local wcpu1 ncpu1 stat1
    wcpu1=$(proc_cpu_ticks "$wpid") ncpu1=$(nginx_cpu_ticks)
    stat1=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8, $5 + $6 }' /proc/stat)
    # reload -> the last row marked sent, from the table (sent_at = now() of the
    # worker's recording transaction); poll granularity does not enter it
    R[$inflight,secs]=$(psqlv -c "SELECT round((extract(epoch FROM max(sent_at)) - $t0)::numeric, 2)
        FROM xcapi_conversions WHERE status = 'sent'")
    R[$inflight,wal_mb]=$(psqlv -c "SELECT round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0') / 1048576.0)")
    R[$inflight,polled_secs]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    R[$inflight,sent]=$done_rows
    R[$inflight,worker_cpu]=$(awk -v a="$wcpu0" -v b="$wcpu1" -v h="$CLK_TCK" 'BEGIN { printf "%.1f", (b - a) / h }')
    R[$inflight,nginx_cpu]=$(awk -v a="$ncpu0" -v b="$ncpu1" -v h="$CLK_TCK" 'BEGIN { printf "%.1f", (b - a) / h }')
    R[$inflight,box_busy]=$(awk -v a="$stat0" -v b="$stat1" 'BEGIN { split(a, x, " "); split(b, y, " ");
        tot = y[1] - x[1]; idle = y[2] - x[2]; printf "%.0f", tot ? 100 * (tot - idle) / tot : 0 }')

    # -- what nginx saw ----------------------------------------------------------
    tail -n +"$((lines0 + 1))" "$NG/logs/access.log" >"$dir/access.log"
    read -r "R[$inflight,requests]" "R[$inflight,req_200]" "R[$inflight,req_mb]" "R[$inflight,conns]" \
        "R[$inflight,ng_first]" "R[$inflight,ng_last]" < <(awk '
        { n++; if ($4 == 200) ok++; bytes += $2 + ($3 == "-" ? 0 : $3); c[$5] = 1
          if (first == "" || $1 < first) first = $1; if ($1 > last) last = $1 }
        END { printf "%d %d %.1f %d %s %s\n", n, ok, bytes / 1048576, length(c), first, last }' "$dir/access.log")
    R[$inflight,first_req]=$(awk -v a="$t0" -v b="${R[$inflight,ng_first]}" 'BEGIN { printf "%.2f", b - a }')
    R[$inflight,ng_span]=$(awk -v a="${R[$inflight,ng_first]}" -v b="${R[$inflight,ng_last]}" 'BEGIN { printf "%.2f", b - a }')

    # -- rates and memory from the samples ----------------------------------------
    read -r "R[$inflight,steady]" "R[$inflight,rss100k]" "R[$inflight,anon100k]" "R[$inflight,rss_last]" \
        "R[$inflight,anon_last]" "R[$inflight,rss_max]" "R[$inflight,anon_max]" "R[$inflight,rss_first]" \
        "R[$inflight,rss_lastgap]" "R[$inflight,anon_lastgap]" < <(awk -v N="$ROWS" '
        { t[NR] = $1; s[NR] = $2; r[NR] = $3; a[NR] = $4
          if ($3 > rmax) rmax = $3; if ($4 > amax) amax = $4 }
        END {
            lo = 0.1 * N; hi = 0.9 * N; tl = th = -1
            for (i = 1; i <= NR; i++) {
                if (tl < 0 && s[i] >= lo) { tl = t[i]; sl = s[i] }
                if (th < 0 && s[i] >= hi) { th = t[i]; sh = s[i] }
                if (r100 == "" && s[i] >= 100000) { r100 = r[i]; a100 = a[i] }
                if (rl == "" && s[i] >= N - 100000) { rl = r[i]; al = a[i] }
            }
            steady = (tl >= 0 && th > tl) ? (sh - sl) / (th - tl) : 0
            printf "%.0f %s %s %s %s %d %d %d %s %s\n", steady, r100 == "" ? "-" : r100, a100 == "" ? "-" : a100,
                r[NR], a[NR], rmax, amax, r[1], rl == "" ? "-" : rl, al == "" ? "-" : al
        }' "$samples")
    R[$inflight,overall]=$(awk -v n="$done_rows" -v s="${R[$inflight,secs]}" 'BEGIN { printf "%.0f", s ? n / s : 0 }')

    # -- the table afterwards ---------------------------------------------------------
    R[$inflight,settings]=$(xcapi_settings)
    R[$inflight,statuses]=$(psqlv -c "SELECT string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM xcapi_conversions GROUP BY 1 ORDER BY 1) s")
    IFS='|' read -r "R[$inflight,total_size]" "R[$inflight,heap_size]" "R[$inflight,idx_size]" "R[$inflight,idx_detail]" < <(psqlv -c "
        SELECT pg_size_pretty(pg_total_relation_size('xcapi_conversions')),
               pg_size_pretty(pg_relation_size('xcapi_conversions')),
               pg_size_pretty(pg_indexes_size('xcapi_conversions')),
               (SELECT string_agg(indexrelid::regclass || ' ' || pg_size_pretty(pg_relation_size(indexrelid)), ', ')
                  FROM pg_index WHERE indrelid = 'xcapi_conversions'::regclass)")
    R[$inflight,dead_tup]=$(psqlv -c "SELECT n_live_tup || ' live / ' || n_dead_tup || ' dead tuples, autovacuum ' || autovacuum_count || 'x'
        FROM pg_stat_user_tables WHERE relname = 'xcapi_conversions'")
    # what a vacuum (autovacuum, at 2 % dead) gets back: sizes and free space
    R[$inflight,intake_after]=$(psqlv -c "SELECT pg_size_pretty(pg_total_relation_size('xcapi_conversions_intake'))
        || ', ' || (SELECT count(*) FROM ONLY xcapi_conversions_intake) || ' rows'")
    psqlb -c "VACUUM xcapi_conversions, xcapi_conversions_intake" >/dev/null
    R[$inflight,intake_vac]=$(psqlv -c "SELECT pg_size_pretty(pg_total_relation_size('xcapi_conversions_intake'))")
    IFS='|' read -r "R[$inflight,total_vac]" "R[$inflight,dead_vac]" < <(psqlv -c "
        SELECT pg_size_pretty(pg_total_relation_size('xcapi_conversions')),
               n_dead_tup FROM pg_stat_user_tables WHERE relname = 'xcapi_conversions'")
    if [ "$have_state" = 1 ]; then
        R[$inflight,wstate]=$(psqlv -c "SELECT 'requests ' || requests || ', conversions_sent ' || conversions_sent || ', retries ' || retries || ', last_http_status ' || coalesce(last_http_status::text, '-') FROM xcapi_worker_state()")
    fi
    grep -E 'WARNING|ERROR|FATAL' "$dir/postgres.log" | grep -v 'could not open credentials file' | tail -n 5 >"$dir/log-problems.txt" || true

    if [ "$PROFILE" = 1 ]; then
        profile_report "$inflight" "$dir"
    fi
    bench_cluster_stop "$data"
    printf '    done: %s sent in %s s (%s conversions/s), nginx saw %s requests\n' \
        "$done_rows" "${R[$inflight,secs]}" "${R[$inflight,overall]}" "${R[$inflight,requests]}"
}

profile_report() {   # inflight dir
    local inflight=$1 dir=$2
    local so_now
    so_now=$(readelf -n "$PG_PKGLIBDIR/xcapi.so" 2>/dev/null | awk '/Build ID/ { print $3 }')
    {
        if [ "$so_now" != "${R[$inflight,so_id]}" ]; then
            printf '\nWARNING: %s/xcapi.so was replaced while this cluster ran (build-id %s, now %s):\n' \
                "$PG_PKGLIBDIR" "${R[$inflight,so_id]}" "$so_now"
            printf '         perf may attribute xcapi.so samples to the wrong functions\n'
        fi
        printf '\n== profile, max_inflight = %s: pg_stat_statements from before the enqueue to the end of the drain (track = all) ==\n' "$inflight"
        psqlb -P pager=off -c "
            SELECT calls, round(total_exec_time::numeric, 0) AS total_ms,
                   round(mean_exec_time::numeric, 2) AS mean_ms, rows,
                   left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS query
              FROM pg_stat_statements
             WHERE query ILIKE '%xcapi_conversions%' AND query NOT ILIKE '%pg_stat_statements%'
             ORDER BY total_exec_time DESC LIMIT 14"
        printf '== profile, max_inflight = %s: perf, xcapi worker, self time by shared object ==\n' "$inflight"
        perf report -i "$dir/worker.perf" --stdio --no-children --sort dso -g none \
            --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 12
        printf '== profile, max_inflight = %s: perf, xcapi worker, self time (top 25) ==\n' "$inflight"
        perf report -i "$dir/worker.perf" --stdio --no-children --sort dso,sym -g none \
            --percent-limit 0.8 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 25
        printf '== profile, max_inflight = %s: perf, xcapi worker, inclusive time of named functions ==\n' "$inflight"
        perf report -i "$dir/worker.perf" --stdio --children --sort sym -g none \
            --percent-limit 2 2>/dev/null | grep -v '^#' | grep -v '^$' | grep -v '\] 0x0000' | head -n 60
    } >"$dir/profile.txt" 2>&1
    cat "$dir/profile.txt"
}

for inflight in $INFLIGHT_LIST; do
    drain_run "$inflight"
done

# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
read -r -a IF <<<"$INFLIGHT_LIST"
base=${IF[0]}
printf '\n%s== drain of %s queued conversions to nginx (TLS, keep-alive), no pacing ==%s\n' "$XC_BOLD" "$ROWS" "$XC_RESET"
row() {   # label key [ratio]
    printf '%-44s' "$1"
    for i in "${IF[@]}"; do printf ' %22s' "${R[$i,$2]:--}"; done
    printf '\n'
}
rrow() {  # label key: value and ratio against the first max_inflight
    printf '%-44s' "$1"
    for i in "${IF[@]}"; do printf ' %22s' "${R[$i,$2]} ($(ratio "${R[$i,$2]}" "${R[$base,$2]}" 2)x)"; done
    printf '\n'
}
printf '%-44s' "xcapi.max_inflight"; for i in "${IF[@]}"; do printf ' %22s' "$i"; done; printf '\n'
row "conversions queued (xcapi_fire), s" enqueue_s
row "rows deferred (due > now()+10s) at reload" deferred
row "sent (rows with status 'sent')" sent
rrow "reload -> last row sent (max(sent_at)), s" secs
row "reload -> poller saw the end, s" polled_secs
rrow "conversions/s overall" overall
rrow "conversions/s steady (10% -> 90% sent)" steady
row "nginx: requests (HTTP 200)" req_200
row "nginx: all requests" requests
row "reload -> first request at nginx, s" first_req
row "nginx: first -> last request, s" ng_span
row "nginx: MiB received" req_mb
row "nginx: TLS connections used" conns
row "worker CPU s during the drain" worker_cpu
row "nginx CPU s during the drain" nginx_cpu
row "whole machine busy during the drain, %" box_busy
row "WAL written during the drain, MiB" wal_mb
row "worker VmRSS kB at start of drain" rss_first
row "worker VmRSS kB at 100k sent" rss100k
row "worker VmRSS kB at $((ROWS - 100000)) sent (last 100k)" rss_lastgap
row "worker VmRSS kB at the end" rss_last
row "worker VmRSS kB max" rss_max
row "worker RssAnon kB at 100k sent" anon100k
row "worker RssAnon kB at $((ROWS - 100000)) sent (last 100k)" anon_lastgap
row "worker RssAnon kB at the end" anon_last
row "worker RssAnon kB max" anon_max
row "pg_total_relation_size, all queued" total_queued
row "pg_total_relation_size after" total_size
row "pg_relation_size (heap) after" heap_size
row "pg_indexes_size after" idx_size
row "pg_total_relation_size after VACUUM" total_vac
row "intake (xcapi_conversions_intake), all queued" intake_queued
row "intake after" intake_after
row "intake after VACUUM" intake_vac
row "dead tuples after VACUUM" dead_vac
for i in "${IF[@]}"; do
    printf '  max_inflight %s: xcapi.* %s\n' "$i" "${R[$i,settings]}"
    printf '  max_inflight %s: statuses: %s\n' "$i" "${R[$i,statuses]}"
    printf '  max_inflight %s: indexes: %s; %s\n' "$i" "${R[$i,idx_detail]}" "${R[$i,dead_tup]}"
    [ -n "${R[$i,held]:-}" ] && printf '  max_inflight %s: NOT SENT (held back when the drain stalled): %s\n' "$i" "${R[$i,held]}"
    [ -n "${R[$i,wstate]:-}" ] && printf '  max_inflight %s: xcapi_worker_state(): %s\n' "$i" "${R[$i,wstate]}"
    if [ -s "$BENCH_WORK/run-$i/log-problems.txt" ]; then
        printf '  max_inflight %s: server log problems:\n' "$i"
        sed 's/^/      /' "$BENCH_WORK/run-$i/log-problems.txt"
    fi
done
printf '  progress polled with: %s, every 0.5 s; target: >= 50,000 conversions/s; nginx requests should be ~ %s / 500 = %s\n' \
    "${R[$base,poll]}" "$ROWS" "$((ROWS / 500))"
printf '  ratios in parentheses are against max_inflight = %s measured in this run\n' "$base"
printf '\n  report saved to %s\n' "$REPORT"
