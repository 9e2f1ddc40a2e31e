#!/usr/bin/env bash
# Postern demo: a database reached through a tunnel, with no open database port.
#
#   bash scripts/demo.sh              # leaves the tunnel up until Ctrl-C
#   bash scripts/demo.sh --no-wait    # checks, cleans up and exits (also: DEMO_NONINTERACTIVE=1)
#
# On this machine, everything in a temporary directory that is removed again
# at the end:
#   1. installs what is missing (scripts/setup.sh: PostgreSQL, iproute2, ...)
#      and builds the `postern` binary (cargo build --release --locked), or
#      uses the one POSTERN_BIN names;
#   2. starts a throwaway PostgreSQL cluster on a random loopback port, with a
#      small `demo` database (initdb refuses root, so as root the cluster is
#      run by the `postgres` system user);
#   3. creates identities for the relay, the outlet, an authority and an
#      intruder; starts the relay (127.0.0.1, random port) and the authority
#      behind it; the admin issues a one-time enrollment ticket, and the
#      analyst's machine enrolls with it (role=analyst, team=data);
#   4. starts an outlet beside the database whose Cedar policy admits analysts
#      of the service's team, with an audit log, and the analyst's inlet on
#      127.0.0.1:15432 (another free port if that one is taken);
#   5. runs a query through the tunnel with psql, shows that the outlet has no
#      listening TCP socket, shows the intruder being refused, and verifies
#      the audit log's hash chain;
#   6. leaves the tunnel up for your own psql until Ctrl-C (unless --no-wait,
#      DEMO_NONINTERACTIVE=1, or CI=true), then stops everything.
#
# The logs of every component are in the temporary directory while it runs;
# if a step fails, their last lines are printed.
set -euo pipefail

usage() {
    sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

wait_for_ctrl_c=1
if [ "${DEMO_NONINTERACTIVE:-0}" != "0" ] && [ -n "${DEMO_NONINTERACTIVE:-}" ]; then
    wait_for_ctrl_c=0
fi
if [ "${CI:-}" = "true" ]; then
    wait_for_ctrl_c=0 # never wait for a Ctrl-C nobody can press
fi
for arg in "$@"; do
    case "$arg" in
        --no-wait) wait_for_ctrl_c=0 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            printf 'demo.sh: unknown argument %q\n' "$arg" >&2
            usage >&2
            exit 2
            ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SERVICE=demo-db
PREFERRED_INLET_PORT=15432

# ----- output helpers ---------------------------------------------------------

if [ -t 1 ]; then
    BOLD=$'\e[1m' GREEN=$'\e[32m' RED=$'\e[31m' DIM=$'\e[2m' RESET=$'\e[0m'
else
    BOLD='' GREEN='' RED='' DIM='' RESET=''
fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    %s✓ %s%s\n' "$GREEN" "$*" "$RESET"; }
indent() { sed 's/^/    │ /'; }
die() {
    printf '\n%sdemo.sh: error: %s%s\n' "$RED" "$*" "$RESET" >&2
    exit 1
}

# ----- state and cleanup --------------------------------------------------------

DEMO_DIR=""
PG_BIN=""
PG_DIR=""
PG_STARTED=0
RELAY_PID=""
OUTLET_PID=""
INLET_PID=""
AUTHORITY_PID=""
SLEEP_PID=""
INTERRUPTED=0

as_postgres() { # runs a PostgreSQL server tool as the cluster's owner
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && "$(command -v runuser || echo /usr/sbin/runuser)" -u postgres -- "$@")
    else
        "$@"
    fi
}

print_log_tails() {
    [ -n "$DEMO_DIR" ] && [ -d "$DEMO_DIR" ] || return 0
    local f
    for f in "$DEMO_DIR"/logs/*.log "$PG_DIR"/postgres.log; do
        [ -s "$f" ] || continue
        printf '\n%s--- last lines of %s ---%s\n' "$BOLD" "$(basename "$f")" "$RESET" >&2
        tail -n 25 "$f" >&2
    done
}

stop_process() { # stop_process PID NAME: SIGTERM, then SIGKILL after 5 s
    local pid=$1 name=$2
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        printf 'demo.sh: %s (pid %s) did not stop within 5 s; killing it\n' "$name" "$pid" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [ "$status" -ne 0 ] && [ "$INTERRUPTED" -eq 0 ]; then
        print_log_tails
    fi
    [ -n "$DEMO_DIR" ] && printf '\n%s==> Cleaning up%s\n' "$BOLD" "$RESET"
    [ -n "$SLEEP_PID" ] && kill "$SLEEP_PID" 2>/dev/null
    stop_process "$INLET_PID" inlet
    stop_process "$OUTLET_PID" outlet
    stop_process "$AUTHORITY_PID" authority
    stop_process "$RELAY_PID" relay
    if [ "$PG_STARTED" -eq 1 ]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
            as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w -t 20 stop >/dev/null 2>&1
    fi
    if [ -n "$DEMO_DIR" ] && [ -d "$DEMO_DIR" ]; then
        rm -rf -- "$DEMO_DIR"
        info "stopped the inlet, outlet, authority, relay and PostgreSQL; removed $DEMO_DIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'INTERRUPTED=1; exit 130' INT
trap 'INTERRUPTED=1; exit 143' TERM

# ----- small tools --------------------------------------------------------------

# Prints the address (ip:port) of every TCP socket process PID listens on.
listening_of() {
    ss -Hltnp 2>/dev/null | grep -F "pid=$1," | awk '{ print $4 }' || true
}

# Whether anything listens on TCP port PORT (any address).
port_busy() {
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
}

random_free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 40000))
        if [ -z "$(ss -Htan "sport = :$p" 2>/dev/null)" ]; then
            echo "$p"
            return 0
        fi
    done
    die "could not find a free TCP port"
}

# Waits until process PID (named NAME) listens on TCP, and prints the port.
# Fails if the process exits first.
wait_listening() {
    local pid=$1 name=$2 addr
    for _ in $(seq 150); do
        addr=$(listening_of "$pid" | head -n 1)
        if [ -n "$addr" ]; then
            echo "${addr##*:}"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "the $name exited during start-up (see its log below)"
        sleep 0.1
    done
    die "the $name did not start listening within 15 s"
}

# ----- 1. prerequisites and build ---------------------------------------------------

step "Checking prerequisites (scripts/setup.sh) and building postern"
bash "$ROOT/scripts/setup.sh" || die "scripts/setup.sh failed; see above"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) and try again"

if [ -n "${POSTERN_BIN:-}" ]; then
    # A binary built already (scripts/test.sh passes its test build).
    POSTERN=$POSTERN_BIN
    [ -x "$POSTERN" ] || die "POSTERN_BIN=$POSTERN is not an executable"
    ok "using $POSTERN (POSTERN_BIN)"
else
    info "cargo build --release --locked (the first build takes a few minutes)"
    cargo build --release --locked --quiet --bin postern || die "the build failed; see above"
    target_dir=$(cargo metadata --format-version 1 --no-deps --locked 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    POSTERN="${target_dir:-${CARGO_TARGET_DIR:-$ROOT/target}}/release/postern"
    [ -x "$POSTERN" ] || die "built binary not found at $POSTERN"
    ok "built $POSTERN"
fi

# The newest /usr/lib/postgresql/<ver>/bin, else pg_config --bindir, else PATH.
# shellcheck disable=SC2012 # version directories have plain names
PG_BIN=$(ls -1d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    PG_BIN=$(pg_config --bindir 2>/dev/null || dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
fi
[ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] || die "PostgreSQL's initdb and pg_ctl not found; run scripts/setup.sh as root"
PSQL="$PG_BIN/psql"
[ -x "$PSQL" ] || PSQL=$(command -v psql) || die "psql not found; run scripts/setup.sh as root"
command -v ss >/dev/null 2>&1 || die "ss (iproute2) not found; run scripts/setup.sh as root"
if [ "$(id -u)" -eq 0 ]; then
    id -u postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the cluster; run scripts/setup.sh"
fi

# ----- 2. a throwaway PostgreSQL cluster ------------------------------------------------

step "Starting a throwaway PostgreSQL cluster"
# Under /tmp, not $TMPDIR: the postgres user must be able to reach it and the
# Unix socket path must stay short.
DEMO_DIR=$(mktemp -d /tmp/postern-demo.XXXXXX)
chmod 0711 "$DEMO_DIR"
mkdir -p "$DEMO_DIR/logs" "$DEMO_DIR/pg"
PG_DIR="$DEMO_DIR/pg"
chmod 0700 "$PG_DIR"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres:postgres "$PG_DIR"
fi
export LC_ALL=C

as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust --no-sync -E UTF8 --locale=C \
    >"$DEMO_DIR/logs/initdb.log" 2>&1 || die "initdb failed"

PG_PORT=""
for _ in 1 2 3 4 5; do
    port=$(random_free_port)
    if as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $PG_DIR -c fsync=off -c synchronous_commit=off" \
        start >>"$DEMO_DIR/logs/pg_ctl.log" 2>&1; then
        PG_PORT=$port
        PG_STARTED=1
        break
    fi
    # Not started: retry on another port if this one was taken meanwhile.
    grep -q "already in use" "$PG_DIR/postgres.log" 2>/dev/null || die "PostgreSQL did not start"
done
[ -n "$PG_PORT" ] || die "PostgreSQL did not start after 5 attempts"

PSQL_DIRECT=("$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
"${PSQL_DIRECT[@]}" -d postgres -c "create database demo" >/dev/null
"${PSQL_DIRECT[@]}" -d demo >/dev/null <<'SQL'
create table customers (
    id      int primary key,
    name    text not null,
    country text not null,
    plan    text not null
);
insert into customers values
    (1, 'Ada Lovelace',      'GB', 'enterprise'),
    (2, 'Grace Hopper',      'US', 'team'),
    (3, 'Edsger Dijkstra',   'NL', 'free'),
    (4, 'Barbara Liskov',    'US', 'enterprise'),
    (5, 'Donald Knuth',      'US', 'team');
SQL
ok "PostgreSQL $("${PSQL_DIRECT[@]}" -d demo -At -c 'show server_version') listening on 127.0.0.1:$PG_PORT only (data in $PG_DIR)"
ok "database \"demo\" with a table \"customers\" (5 rows)"

# ----- 3. identities -----------------------------------------------------------

step "Creating identities (POSTERN_HOME=$DEMO_DIR/home)"
export POSTERN_HOME="$DEMO_DIR/home"
unset POSTERN_IDENTITY POSTERN_LOG POSTERN_PASSPHRASE POSTERN_KEY_FILE POSTERN_TICKET
declare -A ID
# The demo's throwaway keys are stored unencrypted on purpose (--encrypt none):
# at a terminal, `postern identity create` would otherwise ask for a passphrase.
for name in relay outlet authority intruder; do
    ID[$name]=$("$POSTERN" identity create --name "$name" --encrypt none 2>/dev/null) ||
        die "postern identity create --name $name failed"
    info "$(printf '%-9s %s' "$name" "${ID[$name]}")"
done

# ----- 4. relay, authority, enrollment -------------------------------------------------

step "Starting the relay and the authority; the analyst enrolls with a ticket"
"$POSTERN" relay --identity relay --listen 127.0.0.1:0 \
    </dev/null >"$DEMO_DIR/logs/relay.log" 2>&1 &
RELAY_PID=$!
RELAY_PORT=$(wait_listening "$RELAY_PID" relay)
RELAY="127.0.0.1:$RELAY_PORT"
ok "relay     pid $RELAY_PID, listening on $RELAY"

"$POSTERN" authority run --relay "$RELAY" --relay-identity "${ID[relay]}" \
    </dev/null >"$DEMO_DIR/logs/authority.log" 2>&1 &
AUTHORITY_PID=$!
for _ in $(seq 150); do
    grep -q "authority registered at relay" "$DEMO_DIR/logs/authority.log" 2>/dev/null && break
    kill -0 "$AUTHORITY_PID" 2>/dev/null || die "the authority exited during start-up (see its log below)"
    sleep 0.1
done
grep -q "authority registered at relay" "$DEMO_DIR/logs/authority.log" ||
    die "the authority did not register at the relay within 15 s"
ok "authority pid $AUTHORITY_PID, reached through the relay (no port of its own)"

info "\$ postern authority ticket --attr role=analyst --attr team=data --ttl 15m --uses 1 ..."
TICKET=$("$POSTERN" -q authority ticket --attr role=analyst --attr team=data --ttl 15m --uses 1 \
    --relay "$RELAY" --relay-identity "${ID[relay]}" 2>"$DEMO_DIR/logs/ticket.log") ||
    die "postern authority ticket failed: $(cat "$DEMO_DIR/logs/ticket.log")"
info "│ ${TICKET:0:48}…"
info "\$ postern enroll --identity analyst     # on the analyst's laptop; paste the ticket when asked"
# Here the ticket arrives on standard input (`-`); a ticket on the command line is refused.
enrolled=$(printf '%s\n' "$TICKET" | "$POSTERN" -q enroll - --identity analyst --encrypt none 2>&1) ||
    die "postern enroll failed: $enrolled"
printf '%s\n' "$enrolled" | indent
ID[analyst]=$("$POSTERN" identity show --name analyst 2>/dev/null) ||
    die "the analyst has no identity after enrolling"
ok "the analyst ${ID[analyst]} holds a credential signed by the authority"

step "Starting the outlet (a Cedar policy decides, with an audit log) and the analyst's inlet"
mkdir -p "$DEMO_DIR/policies"
cat >"$DEMO_DIR/policies/analysts.cedar" <<'CEDAR'
// Analysts may reach the services of their own team.
@id("analysts-of-the-team")
permit(principal, action == Action::"connect", resource)
when { principal has role && principal.role == "analyst"
       && principal has team && resource has team && principal.team == resource.team };
CEDAR
indent <"$DEMO_DIR/policies/analysts.cedar"
"$POSTERN" outlet --identity outlet --relay "$RELAY" --relay-identity "${ID[relay]}" \
    --service "$SERVICE" --target "127.0.0.1:$PG_PORT" --service-attr team=data \
    --trust-authority "${ID[authority]}" --policies "$DEMO_DIR/policies" \
    --audit-log "$DEMO_DIR/audit.jsonl" \
    </dev/null >"$DEMO_DIR/logs/outlet.log" 2>&1 &
OUTLET_PID=$!
ok "outlet    pid $OUTLET_PID, serves \"$SERVICE\" (team=data) -> 127.0.0.1:$PG_PORT; the policy decides every tunnel"

INLET_LISTEN="127.0.0.1:$PREFERRED_INLET_PORT"
if port_busy "$PREFERRED_INLET_PORT"; then
    INLET_LISTEN="127.0.0.1:0"
fi
start_inlet() {
    "$POSTERN" inlet --identity analyst --relay "$RELAY" --relay-identity "${ID[relay]}" \
        --service "$SERVICE" --outlet-identity "${ID[outlet]}" --listen "$INLET_LISTEN" \
        --trust-authority "${ID[authority]}" \
        </dev/null >"$DEMO_DIR/logs/inlet.log" 2>&1 &
    INLET_PID=$!
}
start_inlet
sleep 0.2
if [ "$INLET_LISTEN" != "127.0.0.1:0" ] && ! kill -0 "$INLET_PID" 2>/dev/null; then
    # Port taken between the check and the bind: take any free one.
    wait "$INLET_PID" 2>/dev/null || true
    INLET_LISTEN="127.0.0.1:0"
    start_inlet
fi
INLET_PORT=$(wait_listening "$INLET_PID" inlet)
ok "inlet     pid $INLET_PID, listening on 127.0.0.1:$INLET_PORT (as the analyst)"
if [ "$INLET_PORT" != "$PREFERRED_INLET_PORT" ]; then
    info "note: port $PREFERRED_INLET_PORT is already in use on this machine, so the inlet listens on $INLET_PORT instead"
fi

# The outlet registers in the background; --check succeeds once it has.
check_output=""
for _ in $(seq 150); do
    if check_output=$(timeout 20 "$POSTERN" -q inlet --identity analyst --relay "$RELAY" \
        --relay-identity "${ID[relay]}" --service "$SERVICE" --outlet-identity "${ID[outlet]}" \
        --trust-authority "${ID[authority]}" --check 2>&1); then
        break
    fi
    kill -0 "$OUTLET_PID" 2>/dev/null || die "the outlet exited during start-up (see its log below)"
    check_output=""
    sleep 0.2
done
[ -n "$check_output" ] || die "the analyst's tunnel did not come up within 30 s"
ok "postern inlet --identity analyst ... --check"
printf '%s\n' "$check_output" | indent

# ----- 5. the checks --------------------------------------------------------------

step "A query through the tunnel: psql -> inlet -> relay -> outlet -> PostgreSQL"
PSQL_TUNNEL=("$PSQL" -X -v ON_ERROR_STOP=1 -P pager=off -h 127.0.0.1 -p "$INLET_PORT" -U postgres -d demo)
query='select id, name, country, plan from customers order by id;'
info "\$ psql -h 127.0.0.1 -p $INLET_PORT -U postgres demo -c '$query'"
result=""
for _ in $(seq 50); do
    # The inlet refuses clients until its own relay connection is up: retry.
    if result=$(PGCONNECT_TIMEOUT=10 "${PSQL_TUNNEL[@]}" -c "$query" 2>&1); then
        break
    fi
    kill -0 "$INLET_PID" 2>/dev/null || die "the inlet exited (see its log below)"
    sleep 0.2
done
printf '%s\n' "$result" | indent
printf '%s\n' "$result" | grep -q "Ada Lovelace" || die "the query through the tunnel failed"
seen=$(PGCONNECT_TIMEOUT=10 "${PSQL_TUNNEL[@]}" -At -c \
    "select format('PostgreSQL on %s:%s served this query; it sees the client at %s (the outlet)',
                   inet_server_addr(), inet_server_port(), inet_client_addr())") ||
    die "the second query through the tunnel failed"
ok "$seen"

step "The outlet has no listening TCP socket"
info "\$ ss -ltnp | grep pid=$OUTLET_PID,   # the outlet"
outlet_listening=$(listening_of "$OUTLET_PID")
if [ -n "$outlet_listening" ]; then
    printf '%s\n' "$outlet_listening" | indent
    die "the outlet is listening on a TCP socket"
fi
info "│ (nothing)"
info "Its TCP connections, all dialled out (each open tunnel adds one to the relay and one to PostgreSQL):"
ss -Htnp state established 2>/dev/null | grep -F "pid=$OUTLET_PID," |
    awk '{ printf "%s -> %s\n", $3, $4 }' | indent || true
info "For contrast, the listening sockets of the relay (pid $RELAY_PID) and the inlet (pid $INLET_PID):"
{ listening_of "$RELAY_PID" | sed 's/^/relay  /'; listening_of "$INLET_PID" | sed 's/^/inlet  /'; } | indent
ok "only the relay accepts connections from other machines; the database host needs no open port"

step "An identity without the analyst credential is refused by the policy"
info "\$ postern inlet --identity intruder ... --check"
set +e
denied=$(timeout 30 "$POSTERN" -q inlet --identity intruder --relay "$RELAY" \
    --relay-identity "${ID[relay]}" --service "$SERVICE" --outlet-identity "${ID[outlet]}" \
    --check 2>&1)
denied_status=$?
set -e
printf '%s\n' "$denied" | indent
if [ "$denied_status" -eq 0 ]; then
    die "the intruder was admitted"
fi
printf '%s\n' "$denied" | grep -q "denied" || die "the intruder failed for another reason than an access denial"
ok "refused by the outlet (exit status $denied_status), which logged:"
grep -F "${ID[intruder]}" "$DEMO_DIR/logs/outlet.log" | grep -i "denied" | tail -n 1 | indent || true

step "Every decision is in the audit log, a hash chain"
info "\$ postern audit verify $DEMO_DIR/audit.jsonl"
sleep 0.5 # the last records are written off the request path
verified=$("$POSTERN" audit verify "$DEMO_DIR/audit.jsonl" 2>&1) || die "the audit log does not verify: $verified"
printf '%s\n' "$verified" | indent
ok "$(grep -c '"event":"connect"' "$DEMO_DIR/audit.jsonl") access decisions recorded; editing, deleting or reordering a line breaks the chain"

# ----- 6. hand over to the user --------------------------------------------------------

step "Demo checks passed"
if [ "$wait_for_ctrl_c" -eq 0 ]; then
    info "non-interactive run: stopping everything now"
    exit 0
fi

cat <<EOF

    ${BOLD}${GREEN}The tunnel is up:  psql -h 127.0.0.1 -p $INLET_PORT -U postgres demo${RESET}
    ${BOLD}Press Ctrl-C to stop${RESET} (the relay, outlet, inlet and PostgreSQL, and the temporary files).

    ${DIM}Relay $RELAY   service "$SERVICE"   PostgreSQL 127.0.0.1:$PG_PORT
    Logs:   tail -f $DEMO_DIR/logs/{relay,outlet,inlet}.log
    Audit:  $POSTERN audit verify $DEMO_DIR/audit.jsonl
    Try:    POSTERN_HOME=$POSTERN_HOME $POSTERN inlet --identity intruder \\
              --relay $RELAY --relay-identity ${ID[relay]} \\
              --service $SERVICE --outlet-identity ${ID[outlet]} --check${RESET}
EOF

while true; do
    sleep 1 &
    SLEEP_PID=$!
    wait "$SLEEP_PID" || true
    SLEEP_PID=""
    for pair in "relay:$RELAY_PID" "authority:$AUTHORITY_PID" "outlet:$OUTLET_PID" "inlet:$INLET_PID"; do
        if ! kill -0 "${pair#*:}" 2>/dev/null; then
            die "the ${pair%%:*} (pid ${pair#*:}) stopped unexpectedly"
        fi
    done
done
