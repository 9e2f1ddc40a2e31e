#!/usr/bin/env bash
# Installs what Postern's tests and benchmarks need on a Debian machine:
#   - PostgreSQL server binaries (initdb, pg_ctl, postgres) under
#     /usr/lib/postgresql/*/bin, for the throwaway clusters of
#     tests/support/pg.rs  -> packages postgresql, postgresql-contrib
#   - pgbench and psql, for the benchmarks (Debian ships pgbench in the
#     server package postgresql-<ver>, psql in postgresql-client-<ver>)
#   - runuser (util-linux): tests run as root start PostgreSQL as `postgres`
#   - ip (iproute2) and nft (nftables) or iptables, for the network-namespace
#     tests; ps/pkill (procps)
#   - python3, whose pty module lets tests/secrets_cli.rs run `postern` on a
#     pseudo-terminal (tests/support/pty_run.py)
#   - Node.js and npm (packages nodejs, npm; the machine image usually has a
#     newer Node.js already), then the npm packages of tests/oidc-provider
#     (`npm ci` there: the `oidc-provider` package that tests/oidc.rs runs as
#     a real OpenID Connect provider). Redone only when node_modules is
#     missing or older than package.json / package-lock.json.
#
# Idempotent and quiet: prints nothing when everything is already there,
# otherwise one line per step. Needs root only when something is missing;
# run without root it reports which packages to install and exits 1.
# Leaves alone a PostgreSQL cluster that was already running; stops a Debian
# default cluster (port 5432) that the package installation itself started.
set -euo pipefail

say() { printf 'setup.sh: %s\n' "$*"; }
die() {
    printf 'setup.sh: error: %s\n' "$*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

# The npm project of the test OpenID Connect provider (tests/support/oidc.rs).
oidc_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/oidc-provider"

# Installs (or refreshes) tests/oidc-provider/node_modules with npm. Needs no
# root. Quiet when it is already up to date.
npm_deps() {
    [ -f "$oidc_dir/package.json" ] || return 0
    { have node && have npm; } || die "node and npm are needed for tests/oidc-provider; install Node.js >= 20 with npm"
    local stamp="$oidc_dir/node_modules/.postern-setup-stamp" f fresh=1
    { [ -f "$stamp" ] && [ -d "$oidc_dir/node_modules/oidc-provider" ]; } || fresh=0
    for f in "$oidc_dir/package.json" "$oidc_dir/package-lock.json"; do
        if [ "$fresh" -eq 1 ] && [ -f "$f" ] && [ "$f" -nt "$stamp" ]; then
            fresh=0
        fi
    done
    [ "$fresh" -eq 0 ] || return 0
    local major
    major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
    if [ "$major" -lt 20 ]; then
        # Debian's nodejs may be older than oidc-provider needs: fetch a
        # Node.js 22 runtime from the npm registry into tests/oidc-provider
        # (tests/support/oidc.rs prefers it) and install with it.
        local arch
        case "$(uname -m)" in
            x86_64) arch=x64 ;;
            aarch64) arch=arm64 ;;
            *) die "Node.js $(node --version 2>/dev/null) is too old (oidc-provider needs >= 20) and no runtime is packaged for $(uname -m): install Node.js >= 20" ;;
        esac
        say "Node.js $(node --version 2>/dev/null) is older than 20: installing node-linux-$arch@22 from the npm registry"
        (cd "$oidc_dir" && npm install --prefix .node-runtime --no-save --no-audit --no-fund --loglevel=error "node-linux-$arch@22") >&2 \
            || die "cannot install a Node.js runtime from the npm registry"
        PATH="$oidc_dir/.node-runtime/node_modules/node-linux-$arch/bin:$PATH"
        export PATH
    fi
    local cmd=install npm_log
    [ -f "$oidc_dir/package-lock.json" ] && cmd=ci
    say "installing the test OIDC provider: npm $cmd in tests/oidc-provider"
    npm_log=$(mktemp /tmp/postern-npm.XXXXXX.log)
    if ! (cd "$oidc_dir" && npm "$cmd" --no-audit --no-fund --loglevel=error) >"$npm_log" 2>&1; then
        cat "$npm_log" >&2
        rm -f "$npm_log"
        die "npm $cmd in $oidc_dir failed"
    fi
    rm -f "$npm_log"
    touch "$stamp"
}

# Prints the newest /usr/lib/postgresql/<ver>/bin/<tool>, if any.
pg_tool() {
    local found=""
    # Sort by version so 9.6 < 10 < 15.
    found=$(ls -1d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$found" ] && [ -x "$found" ]; then
        printf '%s\n' "$found"
    fi
}

pg_version() {
    local initdb
    initdb=$(pg_tool initdb)
    [ -n "$initdb" ] || return 0
    basename "$(dirname "$(dirname "$initdb")")"
}

have_pgbench() { [ -n "$(pg_tool pgbench)" ] || have pgbench; }
have_psql() { [ -n "$(pg_tool psql)" ] || have psql; }

# Online clusters as "ver/name", one per line (empty if pg_lsclusters absent).
online_clusters() {
    if have pg_lsclusters; then
        pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { print $1 "/" $2 }' || true
    fi
}

# ----- work out what is missing -------------------------------------------

missing=()   # packages to install
reasons=()   # human-readable "tool (package)"

need() { # need PACKAGE WHY
    local p
    for p in "${missing[@]+"${missing[@]}"}"; do
        [ "$p" = "$1" ] && return 0
    done
    missing+=("$1")
    reasons+=("$2 ($1)")
}

installing_postgres=0
if [ -z "$(pg_tool initdb)" ]; then
    need postgresql "PostgreSQL server: initdb/pg_ctl under /usr/lib/postgresql/*/bin"
    need postgresql-contrib "PostgreSQL contrib modules"
    installing_postgres=1
else
    ver=$(pg_version)
    [ -n "$(pg_tool pg_ctl)" ] || need "postgresql-$ver" "pg_ctl"
    have_pgbench || need "postgresql-$ver" "pgbench"
    have_psql || need "postgresql-client-$ver" "psql"
fi
have runuser || [ -x /usr/sbin/runuser ] || [ -x /sbin/runuser ] || need util-linux "runuser"
have ip || need iproute2 "ip"
have nft || have iptables || need nftables "nft (or iptables)"
{ have ps && have pkill; } || need procps "ps/pkill"
have python3 || need python3 "python3, to run postern on a pseudo-terminal in tests"
have node || need nodejs "node, for the test OIDC provider"
have npm || need npm "npm, for the test OIDC provider"

if [ "${#missing[@]}" -eq 0 ]; then
    npm_deps
    exit 0
fi

# ----- not root: tell the user what to do ---------------------------------

if [ "$(id -u)" -ne 0 ]; then
    {
        printf 'setup.sh: missing:\n'
        printf '  - %s\n' "${reasons[@]}"
        printf 'setup.sh: run this script as root (sudo %s), or install them yourself:\n' "$0"
        printf '  sudo apt-get update && sudo apt-get install --no-install-recommends %s\n' "${missing[*]}"
    } >&2
    exit 1
fi

have apt-get || die "apt-get not found; this script supports Debian/Ubuntu only. Install: ${missing[*]}"

# ----- install --------------------------------------------------------------

apt_log=$(mktemp /tmp/postern-setup.XXXXXX.log)
trap 'rm -f "$apt_log"' EXIT

run_apt() { # run_apt ARGS...  (quiet; shows apt's output on failure)
    if ! DEBIAN_FRONTEND=noninteractive apt-get -q "$@" >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get $* failed"
    fi
}

apt_install() {
    say "installing: $*"
    run_apt install -y --no-install-recommends "$@"
}

before=$(online_clusters)

say "running apt-get update"
run_apt update
apt_install "${missing[@]}"

# pgbench ships with the server package on Debian 12 (postgresql-15); if
# this distribution puts it elsewhere, install the versioned server and
# client packages that exist.
if ! have_pgbench || ! have_psql; then
    ver=$(pg_version)
    extra=()
    for p in "postgresql-$ver" "postgresql-client-$ver" postgresql-client; do
        if apt-cache show "$p" >/dev/null 2>&1; then
            extra+=("$p")
        fi
    done
    if [ "${#extra[@]}" -gt 0 ]; then
        apt_install "${extra[@]}"
    fi
fi

# ----- stop a default cluster that the installation started ---------------

if [ "$installing_postgres" -eq 1 ]; then
    after=$(online_clusters)
    started=$(comm -13 <(printf '%s\n' "$before" | sort) <(printf '%s\n' "$after" | sort) | sed '/^$/d')
    if [ -n "$started" ]; then
        while IFS=/ read -r v name; do
            say "stopping cluster $v/$name started by the package installation"
            pg_ctlcluster "$v" "$name" stop >/dev/null 2>&1 || true
        done <<<"$started"
    elif ! have pg_lsclusters && [ -z "$before" ]; then
        service postgresql stop >/dev/null 2>&1 || true
    fi
fi

# ----- verify ---------------------------------------------------------------

problems=()
[ -n "$(pg_tool initdb)" ] || problems+=("initdb not under /usr/lib/postgresql/*/bin")
[ -n "$(pg_tool pg_ctl)" ] || problems+=("pg_ctl not under /usr/lib/postgresql/*/bin")
have_pgbench || problems+=("pgbench not found")
have_psql || problems+=("psql not found")
id -u postgres >/dev/null 2>&1 || problems+=("no 'postgres' system user")
have runuser || [ -x /usr/sbin/runuser ] || [ -x /sbin/runuser ] || problems+=("runuser not found")
have ip || problems+=("ip (iproute2) not found")
have nft || have iptables || problems+=("neither nft nor iptables found")
have ps || problems+=("ps (procps) not found")
have node || problems+=("node (nodejs) not found")
have npm || problems+=("npm not found")

if [ "${#problems[@]}" -gt 0 ]; then
    printf 'setup.sh: error: still missing after installation:\n' >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
fi
npm_deps
say "done: PostgreSQL $(pg_version) in $(dirname "$(pg_tool initdb)")"
