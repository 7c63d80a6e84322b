#!/bin/sh
# The one-shot `migrate` service: apply the schema as the superuser, then
# create (or update) the login roles bmsd and Grafana use, with their
# passwords from Docker secrets. Never the superuser for either of them.
# Arguments go to `bmsd migrate` (the demo profile's `demo-data` service
# passes --demo-data).
set -eu
export BMSD_DATABASE_URL="postgresql://postgres@timescaledb:5432/bmsd"
export PGPASSFILE=/tmp/pgpass
umask 077
printf 'timescaledb:5432:*:postgres:%s\n' "$(cat /run/secrets/postgres_password)" > "$PGPASSFILE"
bmsd migrate --wait-for-database "$@"
bmsd create-login bmsd_app --member-of bmsd_ingest --password-file /run/secrets/bmsd_db_password
bmsd create-login grafana --member-of bmsd_reader --password-file /run/secrets/grafana_db_password
