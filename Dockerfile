# The project's own demo: the app `flysticky demo` runs, rendered from template/ by the
# flysticky of this checkout, then built exactly as a generated project builds itself:
# flysticky comes from the wheel `flysticky new` writes into vendor/, nothing is published.
FROM python:3.12-slim AS generate

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY flysticky ./flysticky
COPY template ./template
RUN pip install --no-cache-dir "./[template]" \
    && flysticky new --no-input --output-dir /out project_name="flysticky demo" framework=sanic fly_app_name=flysticky-demo

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080

WORKDIR /app
COPY --from=generate /out/flysticky_demo/requirements.txt ./
COPY --from=generate /out/flysticky_demo/vendor/ vendor/
RUN pip install --no-cache-dir -r requirements.txt

COPY --from=generate /out/flysticky_demo/ ./
RUN useradd --system --uid 10001 --no-create-home app
USER 10001

# 9091: flysticky's metrics, which Fly scrapes (fly.toml [metrics]).
EXPOSE 8080 9091
# Sanic's own server, one process, on port $PORT of every IPv4 and IPv6 address (see
# page.listening_socket). It stops on fly.toml's kill_signal, closing open websockets,
# well within kill_timeout.
CMD ["python", "app.py"]
