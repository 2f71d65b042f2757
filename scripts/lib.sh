# scripts/lib.sh — shared set-up for scripts/test.sh and scripts/demo.sh.
#
# Sourced, not run.  Everything here is idempotent: packages are installed
# only when missing, the OS user is created only once, and each run builds in
# a fresh copy of the source tree so the checkout itself is never written to.
#
# PostgreSQL refuses to run as root, so the scripts run as root for the set-up
# (apt-get, make install, useradd) and hand everything that starts a server to
# the unprivileged OS user $XCAPI_USER, through xc_as_user.

# shellcheck shell=bash

# Some of these are only used by the scripts that source this file.
# shellcheck disable=SC2034
XCAPI_USER=${XCAPI_USER:-xcapi}
PG_MAJOR=15
PG_BINDIR=/usr/lib/postgresql/$PG_MAJOR/bin
PG_CONFIG=$PG_BINDIR/pg_config
# Debian's own python3, which has python3-oauthlib; a pyenv python3 earlier on
# PATH would not.
PYTHON=/usr/bin/python3

XC_PACKAGES=(
    build-essential pkg-config
    "postgresql-server-dev-$PG_MAJOR" "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR"
    libcurl4-openssl-dev libssl-dev openssl
    libipc-run-perl python3-oauthlib
)

XC_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The example credentials from X's OAuth 1.0a documentation, a pixel and an
# event id, for the demo and the benchmarks; t/mock_x.py accepts exactly
# these credentials.
CONSUMER_KEY=xvz1evFS4wEEPTGEFPHBog
CONSUMER_SECRET=kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw
ACCESS_TOKEN=370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb
ACCESS_TOKEN_SECRET=LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE
PIXEL=o8z6j
EVENT=tw-o8z6j-o8z2x

# xc_write_credentials FILE: those credentials as an xcapi credentials file,
# mode 0600.
xc_write_credentials() {
    (
        umask 077
        cat >"$1" <<EOF
# xcapi credentials: the OAuth 1.0a example of X's documentation
consumer_key = '$CONSUMER_KEY'
consumer_secret = '$CONSUMER_SECRET'
access_token = '$ACCESS_TOKEN'
access_token_secret = '$ACCESS_TOKEN_SECRET'
EOF
    )
    chmod 600 "$1"
}

# shellcheck disable=SC2034
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ] && [ "${TERM:-dumb}" != dumb ]; then
    XC_BOLD=$'\e[1m' XC_DIM=$'\e[2m' XC_RED=$'\e[31m' XC_GREEN=$'\e[32m'
    XC_YELLOW=$'\e[33m' XC_RESET=$'\e[0m'
else
    XC_BOLD='' XC_DIM='' XC_RED='' XC_GREEN='' XC_YELLOW='' XC_RESET=''
fi

xc_step() { printf '%s==> %s%s\n' "$XC_BOLD" "$*" "$XC_RESET"; }
xc_info() { printf '    %s\n' "$*"; }
xc_warn() { printf '%swarning:%s %s\n' "$XC_YELLOW" "$XC_RESET" "$*" >&2; }
xc_die()  { printf '%serror:%s %s\n' "$XC_RED" "$XC_RESET" "$*" >&2; exit 1; }

# xc_require_root SCRIPT: the set-up needs apt-get, useradd and make install.
xc_require_root() {
    [ "$(id -u)" -eq 0 ] ||
        xc_die "$1 installs packages and the extension and creates the OS user \"$XCAPI_USER\"; run it as root: sudo $1"
}

# xc_install_packages: apt-get install whatever in XC_PACKAGES is missing.
# Nothing touches apt when everything is already there.
xc_install_packages() {
    local missing=() p st
    for p in "${XC_PACKAGES[@]}"; do
        st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [ "$st" = installed ] || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        xc_info "packages: all ${#XC_PACKAGES[@]} present"
        return 0
    fi
    xc_info "packages: installing ${missing[*]}"
    local log
    log=$(mktemp /tmp/xcapi-apt.XXXXXX.log)
    # A failed update (one unreachable mirror) need not be fatal: the
    # install below says whether the lists were good enough.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q </dev/null >"$log" 2>&1 ||
        xc_warn "apt-get update failed; trying the install anyway"
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
           --no-install-recommends "${missing[@]}" </dev/null >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        xc_die "apt-get failed (full log: $log)"
    fi
    rm -f "$log"
}

# xc_ensure_user: the unprivileged OS user that runs the servers.
xc_ensure_user() {
    if id -u "$XCAPI_USER" >/dev/null 2>&1; then
        xc_info "OS user: $XCAPI_USER exists"
    else
        useradd --system --create-home --user-group --shell /bin/bash \
            --comment 'xcapi tests and demo' "$XCAPI_USER"
        xc_info "OS user: created $XCAPI_USER"
    fi
}

# xc_stage_tree DEST: copy the source tree to DEST (which must exist), minus
# version control and build or test output, and give it to $XCAPI_USER.
xc_stage_tree() {
    local dest=$1
    tar -C "$XC_REPO" -cf - --exclude-vcs \
        --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
        --exclude=__pycache__ --exclude=tmp_check --exclude=tmp_regress \
        --anchored --exclude=./results --exclude=./log \
        --exclude=./regression.diffs --exclude=./regression.out \
        --exclude=./bench/out . |
        tar -C "$dest" --no-same-owner -xf -
    chown -R "$XCAPI_USER:" "$dest"
}

# xc_as_user CMD...: run CMD as $XCAPI_USER with a clean, predictable
# environment: PostgreSQL 15's binaries first on PATH, Debian's python3, a
# UTF-8 locale that exists on every Debian 12.  Variables named in
# XC_PASS_ENV are passed through when set.
XC_PASS_ENV=(PROVE_FLAGS XCAPI_PYTHON PG_TEST_EXTRA PG_TEST_TIMEOUT_DEFAULT PG_TEST_NOCLEAN CI NO_COLOR TERM)
xc_as_user() {
    local envv=(
        "HOME=$(getent passwd "$XCAPI_USER" | cut -d: -f6)"
        "USER=$XCAPI_USER" "LOGNAME=$XCAPI_USER" "SHELL=/bin/bash"
        "PATH=$PG_BINDIR:/usr/sbin:/usr/bin:/sbin:/bin"
        "LANG=C.UTF-8" "TMPDIR=/tmp"
    ) v
    for v in "${XC_PASS_ENV[@]}"; do
        [ -n "${!v:-}" ] && envv+=("$v=${!v}")
    done
    runuser -u "$XCAPI_USER" -- env -i "${envv[@]}" "$@"
}

# xc_build_install DIR [CFLAGS]: build in DIR as $XCAPI_USER, then install as
# root.  Output goes to stdout unless XC_BUILD_LOG names a file to collect it.
xc_build_install() {
    local dir=$1 cflags=${2:-}
    local args=(-C "$dir" "PG_CONFIG=$PG_CONFIG")
    [ -n "$cflags" ] && args+=("PG_CFLAGS=$cflags")
    if [ -n "${XC_BUILD_LOG:-}" ]; then
        if ! xc_as_user make --no-print-directory -j"$(nproc)" "${args[@]}" >>"$XC_BUILD_LOG" 2>&1; then
            tail -n 60 "$XC_BUILD_LOG" >&2
            xc_die "build failed (full log: $XC_BUILD_LOG)"
        fi
        if ! make --no-print-directory "${args[@]}" install >>"$XC_BUILD_LOG" 2>&1; then
            tail -n 30 "$XC_BUILD_LOG" >&2
            xc_die "make install failed (full log: $XC_BUILD_LOG)"
        fi
    else
        xc_as_user make --no-print-directory -j"$(nproc)" "${args[@]}" || xc_die "build failed"
        make --no-print-directory -s "${args[@]}" install >/dev/null || xc_die "make install failed"
    fi
    xc_info "installed into $("$PG_CONFIG" --pkglibdir) and $("$PG_CONFIG" --sharedir)/extension"
}

# xc_setup: the common part of both scripts — packages, OS user.
xc_setup() {
    xc_install_packages
    xc_ensure_user
}
