#!/bin/sh
# Optuna's study gets its own database: its tables and MLflow's must not share one schema.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${OPTUNA_DB:-optuna}\" OWNER \"$POSTGRES_USER\";"
