#!/bin/bash
# User-space instructions per pooled transaction, pgtwist beside PgBouncer, under callgrind.
#
# Seconds of CPU move with this shared box (the same pgtwist commit measured 64 and 131 us/tx
# on two days); instructions do not: the same tree gives the same count to within 0.1 %.
# Each pooler runs under `valgrind --tool=callgrind` twice, serving pgbench -S with CLIENTS
# clients over a pool of POOL (trust auth, transaction pooling) for T1 and then T2 transactions
# per client; the difference of the two totals over the difference of transactions is the cost
# of one more transaction, with start-up and logins cancelled out. Kernel time (send, recv,
# epoll) is not counted: both poolers make the same system calls per transaction.
#
# usage: bench/instructions.sh [--tree DIR] [--clients N] [--pool N] [--targets pgtwist,pgbouncer] [--connect] [--scram]
#                              [--protocol simple|extended|prepared] [--tpcb] [--keep DIR] [--python PATH]
#                              [--bytecodes N] [--syscalls]
#   --tree DIR   the pgtwist source tree to measure (default: this repository), e.g. a
#                `git worktree` of another revision
#   --connect    pgbench -C: a login (and logout) per transaction, the churn of short-lived
#                clients; the figure is then per login with its one transaction
#   --scram      clients log in to the pooler with SCRAM-SHA-256 (the pooler holds PostgreSQL's
#                verifier of the user's password) instead of trust; with --connect, the cost of
#                a SCRAM login. The poolers still reach PostgreSQL by trust.
#   --protocol   pgbench -M: simple (the default), extended (Parse/Bind/Describe/Execute/Sync of
#                the unnamed statement, as psycopg and node-postgres send a query with
#                parameters) or prepared (named statements run again; PgBouncer 1.18 cannot
#                serve it in transaction pooling, so its column then fails)
#   --tpcb       pgbench's default TPC-B-like script instead of -S: BEGIN, three UPDATEs, a
#                SELECT and an INSERT, END, seven statements on one connection per transaction
#   --python PATH  the Python that runs pgtwist (default: this repository's .venv), e.g. a venv
#                of another CPython with pgtwist's dependencies, to compare interpreters
#   --bytecodes N  pgtwist only, not under callgrind: the bytecodes and Python calls per unit of
#                each Python function (bench/bytecodes.py), the top N by bytecodes; callgrind
#                sees only CPython's C functions, which this splits by the Python they run
#   --syscalls   not under callgrind: the system calls per unit, by name (strace -c attached to
#                the running pooler for each load, the two tables subtracted). strace slows the
#                pooler, so epoll_wait's share (how many ready sockets one wake-up serves) reads
#                high; the sends, receives and epoll_ctl calls are the pooler's own choice
#   --keep DIR   keep the callgrind files in DIR (TARGET.T1.callgrind, TARGET.T2.callgrind), to
#                see where the instructions go: callgrind_annotate, or the difference of two runs
# Needs valgrind, the PostgreSQL server binaries, pgbench and (for its column) pgbouncer.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=$HERE CLIENTS=64 POOL=16 TARGETS=pgtwist,pgbouncer T1=20 T2=60 CONNECT=() AUTH=trust PROTOCOL=simple KEEP= SCRIPT=(-S) BYTECODES= SYSCALLS=
PY=$HERE/.venv/bin/python
while [ $# -gt 0 ]; do
    case $1 in
        --tree) TREE=$(cd "$2" && pwd); shift 2 ;;
        --clients) CLIENTS=$2; shift 2 ;;
        --pool) POOL=$2; shift 2 ;;
        --targets) TARGETS=$2; shift 2 ;;
        --connect) CONNECT=(-C); shift ;;
        --scram) AUTH=scram-sha-256; shift ;;
        --protocol) PROTOCOL=$2; shift 2 ;;
        --tpcb) SCRIPT=(); shift ;;
        --keep) mkdir -p "$2"; KEEP=$(cd "$2" && pwd); shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --bytecodes) BYTECODES=$2; TARGETS=pgtwist; shift 2 ;;
        --syscalls) SYSCALLS=1; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
for tool in valgrind callgrind_control "$BIN/pgbench"; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is missing" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/pgtwist-instr-XXXXXX)
chmod 755 "$WORK"
RUNAS=()
[ "$(id -u)" = 0 ] && { chown postgres "$WORK"; RUNAS=(runuser -u postgres --); }
free_port() { "$PY" -c 'from pgtwist.tools.localcluster import free_port; print(free_port())'; }
PGPORT=$(cd "$HERE" && free_port)
cleanup() {
    "${RUNAS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"${RUNAS[@]}" "$BIN/initdb" -A trust -U postgres -D "$WORK/data" >/dev/null
cat >> "$WORK/data/postgresql.conf" <<EOF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = 200
fsync = off
EOF
"${RUNAS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
"$BIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres pgbench
"$BIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PGPORT" -U postgres pgbench >/dev/null 2>&1
# What clients give the poolers: with --scram, a password whose SCRAM verifier PostgreSQL made.
PASSWORD=unused-with-trust SECRET=unused-with-trust
if [ "$AUTH" = scram-sha-256 ]; then
    PASSWORD=instructions-$RANDOM$RANDOM
    "$BIN/psql" -qAt -h 127.0.0.1 -p "$PGPORT" -U postgres -c "ALTER USER postgres PASSWORD '$PASSWORD'" pgbench
    SECRET=$("$BIN/psql" -qAt -h 127.0.0.1 -p "$PGPORT" -U postgres -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'" pgbench)
fi

wait_port() {
    for _ in $(seq 1 900); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.2
    done
    echo "instructions.sh: nothing listens on $1" >&2; return 1
}

# One run: the pooler under callgrind, pgbench -t $2 per client, then the pooler's total Ir.
measure() {
    local target=$1 per_client=$2 port out
    port=$(cd "$HERE" && free_port)
    out="$WORK/$target.$per_client.callgrind"
    [ -n "$BYTECODES" ] && out="$WORK/$target.$per_client.bytecodes"
    [ -n "$SYSCALLS" ] && out="$WORK/$target.$per_client.strace"
    local under=(valgrind --tool=callgrind --callgrind-out-file="$out")
    [ -n "$SYSCALLS" ] && under=()  # (strace attaches to the running pooler below)
    if [ "$target" = pgtwist ]; then
        cat > "$WORK/pgtwist.toml" <<EOF
listen = "127.0.0.1:$port"
pool_mode = "transaction"
pool_size = $POOL
max_client_conn = 10000
auth_type = "$AUTH"
log_connections = false
log_disconnections = false
[databases.pgbench]
nodes = ["127.0.0.1:$PGPORT"]
[users.postgres]
password = "$SECRET"
EOF
        # bench/run.py's twistd-with-this-tree's-plugin launcher.
        local launcher
        launcher=$(sed -n '/^TWISTD_FROM_SOURCE = """/,/^"""/p' "$HERE/bench/run.py" | sed '1d;$d')
        if [ -n "$BYTECODES" ]; then
            # (The tracer writes its counts to $out at exit; the launcher comes through the environment.)
            (cd "$WORK" && PYTHONPATH=$TREE PGTWIST_LAUNCHER=$launcher exec \
                "$PY" -c "import os, sys; sys.path.insert(0, '$HERE/bench'); import bytecodes; bytecodes.install('$out'); exec(os.environ['PGTWIST_LAUNCHER'])" \
                "$TREE" -n --pidfile= --logfile="$WORK/pgtwist.log" pgbalance --config "$WORK/pgtwist.toml" 2>>"$WORK/valgrind.log") &
        else
            (cd "$WORK" && PYTHONPATH=$TREE exec "${under[@]}" \
                "$PY" -c "$launcher" "$TREE" -n --pidfile= --logfile="$WORK/pgtwist.log" \
                pgbalance --config "$WORK/pgtwist.toml" 2>>"$WORK/valgrind.log") &
        fi
    else
        cat > "$WORK/pgbouncer.ini" <<EOF
[databases]
pgbench = host=127.0.0.1 port=$PGPORT dbname=pgbench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $AUTH
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 10000
log_connections = 0
log_disconnections = 0
logfile = $WORK/pgbouncer.log
EOF
        echo "\"postgres\" \"$SECRET\"" > "$WORK/userlist.txt"
        chmod 644 "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
        "${RUNAS[@]}" "${under[@]}" \
            "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" "$WORK/pgbouncer.ini" 2>>"$WORK/valgrind.log" &
    fi
    local pid=$! tracer=
    wait_port "$port"
    if [ -n "$SYSCALLS" ]; then
        # (The pooler itself, found by its config file, which only this run's pooler names:
        # under runuser, pgbouncer is runuser's child.)
        local pooler
        pooler=$(pgrep -n -f "$WORK/pgbouncer.ini|$WORK/pgtwist.toml" | head -1)
        strace -c -f -p "$pooler" -o "$out" 2>>"$WORK/strace.log" &
        tracer=$!
        sleep 1  # (strace attaches to every thread before it counts)
    fi
    PGPASSWORD=$PASSWORD "$BIN/pgbench" -n "${SCRIPT[@]}" -M "$PROTOCOL" "${CONNECT[@]}" -c "$CLIENTS" -j 2 -t "$per_client" -h 127.0.0.1 -p "$port" -U postgres pgbench \
        >"$WORK/pgbench.log" 2>&1 || { cat "$WORK/pgbench.log" >&2; return 1; }
    if [ -n "$SYSCALLS" ]; then
        kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
        pkill -TERM -f "$WORK/pgbouncer.ini|$WORK/pgtwist.toml" || true
        wait "$pid" 2>/dev/null || true
        [ -n "$KEEP" ] && cp "$out" "$KEEP/"
        echo "$out"
        return
    fi
    if [ -n "$BYTECODES" ]; then
        pkill -TERM -f "$out" || true
        wait "$pid" 2>/dev/null || true
        for _ in $(seq 1 300); do [ -s "$out" ] && break; sleep 0.2; done
        [ -n "$KEEP" ] && cp "$out" "$KEEP/"
        echo "$out"
        return
    fi
    pkill -TERM -f "callgrind-out-file=$out" || true
    wait "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do grep -q '^totals:' "$out" 2>/dev/null && break; sleep 0.2; done
    [ -n "$KEEP" ] && cp "$out" "$KEEP/"
    awk '/^totals:/ {print $2}' "$out"
}

unit=transaction
[ ${#CONNECT[@]} -gt 0 ] && unit="login (pgbench -C: a login, one transaction, a logout)"
what="user-space instructions per $unit (callgrind"
[ -n "$BYTECODES" ] && what="Python bytecodes and calls per $unit (bench/bytecodes.py"
[ -n "$SYSCALLS" ] && what="system calls per $unit (strace -c"
echo "bench/instructions.sh: pgbench ${SCRIPT[*]:-(TPC-B)} -M $PROTOCOL, $CLIENTS clients over pool $POOL, transaction pooling, $AUTH;" \
     "$what; $T1 and $T2 transactions per client)"
for target in ${TARGETS//,/ }; do
    if [ "$target" = pgbouncer ] && ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
        echo "pgbouncer: not installed (apt-get install pgbouncer), skipped"; continue
    fi
    first=$(measure "$target" "$T1")
    second=$(measure "$target" "$T2")
    if [ -n "$SYSCALLS" ]; then
        echo "$target, per ${unit%% *}:"
        "$PY" - "$first" "$second" "$(( CLIENTS * (T2 - T1) ))" <<'PY'
import sys
def calls(path):
    counts = {}
    for line in open(path):
        cols = line.split()
        if len(cols) >= 5 and cols[0][0].isdigit() and cols[-1] != "total":
            counts[cols[-1]] = int(cols[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    return counts
first, second, units = calls(sys.argv[1]), calls(sys.argv[2]), int(sys.argv[3])
rows = sorted(((second.get(k, 0) - first.get(k, 0)) / units, k) for k in set(first) | set(second))
print("  all: %.2f" % sum(r for r, _ in rows))
for per, name in reversed(rows):
    if abs(per) >= 0.005:
        print("  %-16s %6.2f" % (name, per))
PY
        continue
    fi
    if [ -n "$BYTECODES" ]; then
        echo "$target, per ${unit%% *}:"
        "$PY" "$HERE/bench/bytecodes.py" report "$first" "$second" "$(( CLIENTS * (T2 - T1) ))" "$BYTECODES"
        continue
    fi
    echo "$target: $(( (second - first) / (CLIENTS * (T2 - T1)) )) instructions/${unit%% *}"
done
