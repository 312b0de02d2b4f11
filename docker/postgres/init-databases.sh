#!/bin/sh
# Run once by the official postgres image on an empty data volume (/docker-entrypoint-initdb.d), as
# the superuser `postgres`: the
# login role `olora` (password from OLORA_STACK_PG_PASSWORD) owns the databases mlflow, mlflow_auth
# and prefect; PUBLIC has no rights on them; pg_trgm (Prefect's server needs it) in prefect.
set -eu
: "${OLORA_STACK_PG_PASSWORD:?set OLORA_STACK_PG_PASSWORD}"
psql -v ON_ERROR_STOP=1 -v pw="$OLORA_STACK_PG_PASSWORD" --username "$POSTGRES_USER" --dbname postgres <<'SQL'
CREATE ROLE olora LOGIN PASSWORD :'pw';
CREATE DATABASE mlflow OWNER olora;
CREATE DATABASE mlflow_auth OWNER olora;
CREATE DATABASE prefect OWNER olora;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
