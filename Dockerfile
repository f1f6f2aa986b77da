# The relay image: `docker compose up` builds it; the same image runs migrations and the daemon.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini constraints.txt ./
COPY relay ./relay
COPY models ./models
COPY alembic ./alembic
# constraints.txt pins every dependency, so a rebuild installs what was tested.
RUN pip install --no-cache-dir -c constraints.txt . && useradd --system relay
USER relay
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
