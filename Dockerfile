# One image for the user-code server, webserver and daemon (docker-compose.yml).
FROM python:3.11-slim
WORKDIR /opt/orch_project
COPY pyproject.toml README.md ./
COPY orch_project ./orch_project
RUN pip install --no-cache-dir .
COPY dagster.postgres.yaml /opt/dagster/dagster_home/dagster.yaml
COPY workspace.docker.yaml /opt/dagster/workspace.yaml
ENV DAGSTER_HOME=/opt/dagster/dagster_home \
    ORCH_HOME=/opt/orch_home
