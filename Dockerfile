# The project's own demo: the app `flysticky demo` runs, rendered from template/ by
# the flysticky installed here from this checkout.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY flysticky ./flysticky
COPY template ./template
RUN pip install --no-cache-dir "./[sanic,template]" \
    && flysticky new --no-input --output-dir /srv project_name="flysticky demo" framework=sanic fly_app_name=flysticky-demo \
    && useradd --system --uid 10001 --no-create-home app

WORKDIR /srv/flysticky_demo
USER 10001

EXPOSE 8080
# Sanic's own server, one process, on 0.0.0.0:$PORT (see app.py).
CMD ["python", "app.py"]
