#!/bin/sh
# What the stack keeps in PostgreSQL, made as the superuser `postgres`: the login role `olora` (password from
# OLORA_STACK_PG_PASSWORD) owns the databases mlflow, mlflow_auth, prefect and optuna (Optuna's studies);
# PUBLIC has no rights on them; pg_trgm (Prefect's server needs it) in prefect.
# Idempotent: the postgres image runs it once, on an empty data volume (/docker-entrypoint-initdb.d), and
# `make stack` (python -m olora.ops.stack up) runs it again in the running container on every `up`, so a
# volume made before a database was added here gets that database.
set -eu
: "${OLORA_STACK_PG_PASSWORD:?set OLORA_STACK_PG_PASSWORD}"
export PGHOST="${PGHOST:-/var/run/postgresql}"  # the server's socket (an exec into the container sets no PGHOST)
psql -q -v ON_ERROR_STOP=1 -v pw="$OLORA_STACK_PG_PASSWORD" --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
SELECT format('CREATE ROLE olora LOGIN PASSWORD %L', :'pw') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'olora')
\gexec
SELECT format('CREATE DATABASE %I OWNER olora', name) FROM unnest(ARRAY['mlflow', 'mlflow_auth', 'prefect', 'optuna']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name)
\gexec
SELECT format('ALTER DATABASE %I OWNER TO olora', name), format('REVOKE ALL ON DATABASE %I FROM PUBLIC', name)
  FROM unnest(ARRAY['mlflow', 'mlflow_auth', 'prefect', 'optuna']) AS name
\gexec
\connect prefect
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
