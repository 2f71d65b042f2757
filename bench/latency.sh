#!/usr/bin/env bash
# bench/latency.sh — commit-to-X latency of single conversions (issue 5, item 2).
#
#   sudo bench/latency.sh [--samples N] [--scenarios LIST] [--no-build] [--keep]
#
#   --samples N        samples per scenario (default 200; idle takes N x 1.5 s)
#   --scenarios LIST   comma-separated, from direct,trickle,idle (default all;
#                      direct is the baseline of the ratios)
#   --no-build         use the installed xcapi.so instead of make && make install
#   --keep             keep the work directory in /tmp
#
# Starts the Python mock of X (t/mock_x.py: HTTPS with a self-signed
# certificate, OAuth 1.0a checked with python3-oauthlib) as the OS user
# xcapi, and a throwaway cluster (Unix socket, port 55433) with xcapi
# preloaded, pointing at the mock, with a credentials file (X's
# documentation example, which the mock accepts) and otherwise default
# settings.  Then runs bench/latency.py: each sample commits one
# xcapi_fire(...) and measures commit -> arrival at the mock.  Targets:
# p50 <= 5 ms, p99 <= 25 ms.  Reports only: no pass/fail.  Not part of the
# test suite.

set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SAMPLES=200 SCENARIOS=direct,trickle,idle PORT=55433
while [ $# -gt 0 ]; do
    case $1 in
        --samples) SAMPLES=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        *) bench_option "$1" ;;
    esac
    shift
done

bench_begin latency python3-psycopg2 python3-oauthlib openssl

# -- the mock ----------------------------------------------------------------
bench_start_mock

# -- the cluster ---------------------------------------------------------------
bench_write_credentials
DATA=$BENCH_WORK/data
bench_cluster_init "$DATA" "$PORT" bench <<EOF
shared_preload_libraries = 'xcapi'
xcapi.database = 'bench'
xcapi.api_url = 'https://127.0.0.1:$MOCK_PORT'
xcapi.ca_file = '$MOCK/cert.pem'
xcapi.credentials_file = '$CREDS'
EOF
bench_cluster_start "$DATA"
psqlb -c "CREATE EXTENSION xcapi"

bench_header "xcapi latency benchmark (bench/latency.sh)"
printf '  mock        t/mock_x.py on https://127.0.0.1:%s (Python, OAuth verified with oauthlib)\n' "$MOCK_PORT"
printf '  cluster     %s, port %s, defaults + xcapi preloaded, credentials file\n' "$DATA" "$PORT"
printf '  xcapi.*     %s\n' "$(xcapi_settings)"
printf '  samples     %s per scenario: %s\n' "$SAMPLES" "$SCENARIOS"
xc_step "Running (idle takes about $((SAMPLES * 3 / 2)) s)"
"$PYTHON" "$BENCH_DIR/latency.py" --dsn "host=$BENCH_WORK port=$PORT user=$XCAPI_USER dbname=bench" \
    --mock-dir "$MOCK" --mock-url "https://127.0.0.1:$MOCK_PORT" --samples "$SAMPLES" \
    --scenarios "$SCENARIOS" --pixel "$PIXEL" --event o8z2x --progress \
    --consumer-key "$CONSUMER_KEY" --consumer-secret "$CONSUMER_SECRET" \
    --token "$ACCESS_TOKEN" --token-secret "$ACCESS_TOKEN_SECRET" | tee "$BENCH_WORK/latency.out" |
    grep -v '^JSON '
printf '  conversions in the outbox: %s\n' "$(psqlv -c "SELECT string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM xcapi_conversions GROUP BY 1 ORDER BY 1) s")"
printf '\n  report saved to %s\n' "$REPORT"
