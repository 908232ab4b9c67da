# One image for every service of compose.yaml: workers, frontend, demo app.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY bus ./bus
COPY workers ./workers
RUN pip install --no-cache-dir ".[all]"

RUN useradd --create-home --uid 10001 lcbus
USER lcbus

# arq and uvicorn both stop gracefully on SIGTERM.
STOPSIGNAL SIGTERM
CMD ["lcbus", "--help"]
