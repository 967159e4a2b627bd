#!/bin/bash
# The compose primary's first start (docker-entrypoint-initdb.d): a replication role for the
# replica, a monitoring role for pgtwist's health checks, and pg_hba lines for both.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator';
CREATE ROLE pgtwist_monitor WITH LOGIN PASSWORD 'monitor' IN ROLE pg_monitor;
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
