# The relay image: `docker compose up` builds it; the same image runs migrations and the daemon.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY relay ./relay
COPY models ./models
COPY alembic ./alembic
RUN pip install --no-cache-dir . && useradd --system relay
USER relay
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
