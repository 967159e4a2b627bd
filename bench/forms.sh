#!/bin/bash
# Pooler CPU per transaction: pgtwist's compiled core, its pure-Python form and PgBouncer, in turn.
#
# One PostgreSQL (trust), pgbench -S with CLIENTS clients over a pool of 16 (transaction pooling)
# against each pooler in turn, ROUNDS times; each pooler's CPU (utime + stime, /proc) over the
# transactions pgbench reports. RATE=N holds pgbench to N transactions a second (-R), so that
# every pooler does the same work at the same pace; RATE=0 (the default) runs flat out.
#
# usage: [RATE=0] [T=10] [CLIENTS=64] [ROUNDS=3] bench/forms.sh
# Needs the PostgreSQL server binaries, pgbench, pgbouncer, and the compiled core built (./dev setup).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
RATE=${RATE:-0} T=${T:-10} CLIENTS=${CLIENTS:-64} ROUNDS=${ROUNDS:-3}
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ "$(cd "$HERE" && "$PY" -c 'import pgtwist.compiled as c; print(c.FORM)')" = compiled ] \
    || { echo "forms.sh: the core is not compiled here (./dev setup builds it)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/pgtwist-forms-XXXXXX)
chmod 755 "$WORK"
RUNAS=()
[ "$(id -u)" = 0 ] && { chown postgres "$WORK"; RUNAS=(runuser -u postgres --); }
free_port() { (cd "$HERE" && "$PY" -c 'from pgtwist.tools.localcluster import free_port; print(free_port())'); }
PGPORT=$(free_port)
cleanup() {
    "${RUNAS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    pkill -f "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"${RUNAS[@]}" "$BIN/initdb" -A trust -U postgres -D "$WORK/data" >/dev/null
printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 100\nfsync = off\n" "$PGPORT" >> "$WORK/data/postgresql.conf"
"${RUNAS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
"$BIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres pgbench
"$BIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PGPORT" -U postgres pgbench >/dev/null 2>&1
# bench/run.py's twistd-with-this-tree's-plugin launcher.
launcher=$(sed -n '/^TWISTD_FROM_SOURCE = """/,/^"""/p' "$HERE/bench/run.py" | sed '1d;$d')
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }  # (user, system)
wait_port() {
    for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    echo "forms.sh: nothing listens on $1" >&2; return 1
}

run_one() {
    local target=$1 port pid
    port=$(free_port)
    if [ "$target" = pgbouncer ]; then
        printf '[databases]\npgbench = host=127.0.0.1 port=%s dbname=pgbench\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %s\nunix_socket_dir =\nauth_type = trust\nauth_file = %s/userlist.txt\npool_mode = transaction\ndefault_pool_size = 16\nmax_client_conn = 10000\nlog_connections = 0\nlog_disconnections = 0\nlogfile = %s/pgbouncer.log\n' \
            "$PGPORT" "$port" "$WORK" "$WORK" > "$WORK/pgbouncer.ini"
        echo '"postgres" ""' > "$WORK/userlist.txt"
        chmod 644 "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
        "${RUNAS[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
    else
        printf 'listen = "127.0.0.1:%s"\npool_mode = "transaction"\npool_size = 16\nmax_client_conn = 10000\nauth_type = "trust"\nlog_connections = false\nlog_disconnections = false\n[databases.pgbench]\nnodes = ["127.0.0.1:%s"]\n[users.postgres]\npassword = "trust-ignores-it"\n' \
            "$port" "$PGPORT" > "$WORK/pgtwist.toml"
        local pure=
        [ "$target" = pure ] && pure=1
        (cd "$WORK" && PGTWIST_PURE=$pure PYTHONPATH=$HERE exec "$PY" -c "$launcher" "$HERE" -n --pidfile= \
            --logfile="$WORK/pgtwist.log" pgbalance --config "$WORK/pgtwist.toml") &
    fi
    wait_port "$port"
    pid=$(ss -ltnp "sport = :$port" | grep -oP 'pid=\K\d+' | head -1)
    "$BIN/pgbench" -n -S -c "$CLIENTS" -j 2 -T 2 -h 127.0.0.1 -p "$port" -U postgres pgbench >/dev/null 2>&1  # (warm: logins, pool)
    local rate=(-R "$RATE") user0 sys0 user1 sys1 out tx hz
    [ "$RATE" = 0 ] && rate=()
    read -r user0 sys0 < <(ticks "$pid")
    out=$("$BIN/pgbench" -n -S -c "$CLIENTS" -j 2 "${rate[@]}" -T "$T" -h 127.0.0.1 -p "$port" -U postgres pgbench 2>&1)
    read -r user1 sys1 < <(ticks "$pid")
    tx=$(echo "$out" | grep -oP 'number of transactions actually processed: \K\d+')
    kill "$pid"; sleep 0.5
    hz=$(getconf CLK_TCK)
    printf '%-9s %6.1f us/tx (user %5.1f, system %5.1f)  %7d tx  latency %s\n' "$target" \
        "$(echo "($user1 + $sys1 - $user0 - $sys0) * 1000000 / $hz / $tx" | bc -l)" \
        "$(echo "($user1 - $user0) * 1000000 / $hz / $tx" | bc -l)" "$(echo "($sys1 - $sys0) * 1000000 / $hz / $tx" | bc -l)" \
        "$tx" "$(echo "$out" | grep -oP 'latency average = \K[\d.]+ ms')"
}

limit=
[ "$RATE" = 0 ] || limit=" -R $RATE"
echo "pgbench -S -c $CLIENTS -j 2 -T $T$limit over pool 16, transaction pooling, trust; pooler CPU per transaction"
for _ in $(seq 1 "$ROUNDS"); do
    for target in compiled pure pgbouncer; do run_one "$target"; done
done
