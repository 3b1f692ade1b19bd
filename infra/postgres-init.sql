-- One PostgreSQL for the stack, one database per service (run once by the postgres image on an
-- empty volume; owned by POSTGRES_USER, which runs this script).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
