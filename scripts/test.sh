#!/usr/bin/env bash
# scripts/test.sh — build xcapi and run every test: pg_regress, then TAP.
#
#   sudo scripts/test.sh                    everything (what CI runs)
#   sudo scripts/test.sh regress [NAME...]  pg_regress only (names from sql/)
#   sudo scripts/test.sh tap [TEST...]      TAP only (t/NNN_name.pl)
#   sudo scripts/test.sh t/001_delivery.pl  a bare test file implies "tap";
#                                           a bare sql/ name implies "regress"
# Options:
#   -k, --keep   keep the work directory even when everything passes
#   -h, --help
# Environment: REGRESS / PROVE_TESTS select tests like the arguments do;
# PROVE_FLAGS (e.g. --verbose), PG_TEST_EXTRA and PG_TEST_TIMEOUT_DEFAULT are
# passed to the TAP tests; WERROR=0 builds without -Werror (default on, as in
# CI); XCAPI_TEST_TIMEOUT caps the test phases together, in seconds (default
# 1500, to stay inside CI's 30 minutes).
#
# As root it installs missing build dependencies (apt-get), creates the OS
# user "xcapi", copies the tree to /tmp/xcapi-test.XXXXXX, builds it there
# with -Werror, installs the extension, and runs `make installcheck` as
# "xcapi": pg_regress and the isolation tests (specs/) on their own temporary
# instances (REGRESS_OPTS, ISOLATION_OPTS), then prove t/*.pl.  The checkout is never written to.  On failure it prints
# regression.diffs and the TAP logs and exits non-zero.

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

mode='' keep=0 regress_sel=() tap_sel=()
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        -k|--keep) keep=1 ;;
        all|regress|tap)
            [ -z "$mode" ] || xc_die "only one of all, regress, tap (see --help)"
            mode=$1 ;;
        -*) xc_die "unrecognized option: $1 (see --help)" ;;
        *.pl|t/*) tap_sel+=("t/$(basename "$1")") ;;
        *) n=$(basename "$1"); regress_sel+=("${n%.sql}") ;;
    esac
    shift
done

# Environment selections, as with plain `make installcheck`.
if [ ${#regress_sel[@]} -eq 0 ] && [ -n "${REGRESS:-}" ]; then
    read -r -a regress_sel <<<"$REGRESS"
fi
if [ ${#tap_sel[@]} -eq 0 ] && [ -n "${PROVE_TESTS:-}" ]; then
    read -r -a tap_sel <<<"$PROVE_TESTS"
fi
if [ -z "$mode" ]; then
    if [ ${#tap_sel[@]} -gt 0 ] && [ ${#regress_sel[@]} -eq 0 ]; then mode=tap
    elif [ ${#regress_sel[@]} -gt 0 ] && [ ${#tap_sel[@]} -eq 0 ]; then mode=regress
    else mode=all
    fi
fi
[ "$mode" = tap ] && [ ${#regress_sel[@]} -gt 0 ] &&
    xc_die "regress tests named in tap mode: ${regress_sel[*]}"
[ "$mode" = regress ] && [ ${#tap_sel[@]} -gt 0 ] &&
    xc_die "TAP tests named in regress mode: ${tap_sel[*]}"
for f in "${tap_sel[@]}"; do
    [ -f "$XC_REPO/$f" ] || xc_die "no such TAP test: $f"
done
for n in "${regress_sel[@]}"; do
    [ -f "$XC_REPO/sql/$n.sql" ] || xc_die "no such regress test: sql/$n.sql"
done

xc_require_root scripts/test.sh
started=$SECONDS
deadline=$((SECONDS + ${XCAPI_TEST_TIMEOUT:-1500}))

xc_step "Set-up"
xc_setup

work=$(mktemp -d /tmp/xcapi-test.XXXXXX)
chmod 755 "$work"
# Whatever fails from here on, say where to look.
summary_done=0
trap 'rc=$?; [ $rc -eq 0 ] || [ $summary_done -eq 1 ] || [ ! -d "$work" ] || printf "work dir kept for inspection: %s\n" "$work" >&2' EXIT
xc_stage_tree "$work"
xc_info "work dir: $work"

cflags=-Werror
[ "${WERROR:-1}" = 0 ] && cflags=''
xc_step "Build${cflags:+ ($cflags)} and install"
xc_build_install "$work" "$cflags"

# run_phase NAME MAKE-VARS...: `make installcheck` as $XCAPI_USER, output to
# stdout and to $work/NAME.out.  Sets phase_rc.
run_phase() {
    local name=$1; shift
    xc_step "make installcheck: $name"
    phase_rc=0
    local phase_timeout=$((deadline - SECONDS))
    [ $phase_timeout -ge 60 ] || phase_timeout=60
    xc_as_user timeout --kill-after=30 "$phase_timeout" \
        make --no-print-directory -C "$work" "PG_CONFIG=$PG_CONFIG" "$@" installcheck 2>&1 |
        tee "$work/$name.out" || phase_rc=$?
    if [ "$phase_rc" -eq 124 ] || [ "$phase_rc" -eq 137 ]; then
        printf '%s%s timed out after %s s%s\n' "$XC_RED" "$name" "$phase_timeout" "$XC_RESET"
        echo "timed out after $phase_timeout s" >>"$work/$name.out"
    fi
    stop_leftover_servers
}

# A test killed by the timeout leaves its servers running (pg_ctl detaches
# them): stop every server whose data directory lies in the work dir.
stop_leftover_servers() {
    local pid d
    while IFS= read -r pid; do
        d=$(dirname "$pid")
        xc_warn "stopping a server left running in $d"
        xc_as_user pg_ctl -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
    done < <(find "$work" -name postmaster.pid -type f 2>/dev/null)
}

trap 'stop_leftover_servers; exit 130' INT TERM

# What a phase reported, in one line, for the summary.
phase_line() {
    local out=$1 rc=$2 line failed_files
    if [ "$rc" -eq 0 ]; then
        line=$(grep -Eo 'All [0-9]+ tests passed|^Files=[0-9]+, Tests=[0-9]+' "$out" | paste -sd' ' - || true)
        printf '%sok%s      %s' "$XC_GREEN" "$XC_RESET" "${line:-passed}"
    else
        line=$(grep -Eo '[0-9]+ of [0-9]+ tests (failed|passed)[^.]*|^Files=[0-9]+, Tests=[0-9]+|Result: [A-Z]+|^timed out after .*' "$out" | paste -sd' ' - || true)
        failed_files=$(sed -n '/^Test Summary Report/,$s/^\(t\/[^ ]*\.pl\) .*/\1/p' "$out" | paste -sd' ' - || true)
        [ -z "$failed_files" ] || line="$line; failed: $failed_files"
        printf '%sFAILED%s  %s' "$XC_RED" "$XC_RESET" "${line:-exit status $rc}"
    fi
}

regress_rc=skip tap_rc=skip
if [ "$mode" != tap ]; then
    vars=(TAP_TESTS=)
    [ ${#regress_sel[@]} -gt 0 ] && vars+=("REGRESS=${regress_sel[*]}")
    run_phase regress "${vars[@]}"
    regress_rc=$phase_rc
fi
if [ "$mode" != regress ]; then
    vars=(REGRESS= ISOLATION=)
    [ ${#tap_sel[@]} -gt 0 ] && vars+=("PROVE_TESTS=${tap_sel[*]}")
    run_phase tap "${vars[@]}"
    tap_rc=$phase_rc
fi

failed=0
[ "$regress_rc" = skip ] || [ "$regress_rc" -eq 0 ] || failed=1
[ "$tap_rc" = skip ] || [ "$tap_rc" -eq 0 ] || failed=1

# Show failures where a CI log reader will see them.
if [ "$regress_rc" != skip ] && [ "$regress_rc" -ne 0 ]; then
    for f in "$work/regression.diffs" "$work/output_iso/regression.diffs"; do
        [ -s "$f" ] || continue
        xc_step "$f (first 400 lines)"
        head -n 400 "$f"
    done
    for f in "$work"/tmp_regress/log/postmaster.log "$work"/tmp_isolation/log/postmaster.log \
        "$work"/log/postmaster.log; do
        [ -s "$f" ] || continue
        xc_step "$f (last 100 lines)"
        tail -n 100 "$f"
    done
fi
if [ "$tap_rc" != skip ] && [ "$tap_rc" -ne 0 ] && [ -d "$work/tmp_check/log" ]; then
    # Logs of the scripts prove lists as failed, or all logs if it listed none.
    mapfile -t bad < <(sed -n '/^Test Summary Report/,$s/^\(t\/[^ ]*\)\.pl .*/\1/p' \
        "$work/tap.out" | xargs -r -n1 basename)
    mapfile -t logs < <(find "$work/tmp_check/log" -type f | sort)
    for f in "${logs[@]}"; do
        if [ ${#bad[@]} -gt 0 ]; then
            hit=0
            for b in "${bad[@]}"; do
                case $(basename "$f") in *"$b"*) hit=1 ;; esac
            done
            [ $hit -eq 1 ] || continue
        fi
        xc_step "$f (last 200 lines)"
        tail -n 200 "$f"
    done
fi

xc_step "Summary"
printf '    build    %sok%s      %s\n' "$XC_GREEN" "$XC_RESET" "${cflags:-no -Werror}"
[ "$regress_rc" = skip ] || printf '    regress  %s\n' "$(phase_line "$work/regress.out" "$regress_rc")"
[ "$tap_rc" = skip ] || printf '    tap      %s\n' "$(phase_line "$work/tap.out" "$tap_rc")"
elapsed=$((SECONDS - started))
summary_done=1
if [ $failed -ne 0 ]; then
    printf '%sxcapi tests FAILED%s (%s, %d s); work dir kept: %s\n' \
        "$XC_RED$XC_BOLD" "$XC_RESET" "$mode" "$elapsed" "$work"
    exit 1
fi
if [ $keep -eq 1 ]; then
    printf '%sxcapi tests passed%s (%s, %d s); work dir kept: %s\n' \
        "$XC_GREEN$XC_BOLD" "$XC_RESET" "$mode" "$elapsed" "$work"
else
    rm -rf "$work"
    printf '%sxcapi tests passed%s (%s, %d s)\n' \
        "$XC_GREEN$XC_BOLD" "$XC_RESET" "$mode" "$elapsed"
fi
