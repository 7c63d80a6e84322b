# bmsd's image: the wheel, built in a first stage, installed in a slim Python.
# docker compose builds it (docker-compose.yml); alone:
#   docker build -t bmsd . && docker run --rm bmsd --version
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir "build==1.2.2.post1"
# bmsd/sql, bmsd/defaults and bmsd/systemd link to these folders.
COPY pyproject.toml README.md ./
COPY bmsd/ bmsd/
COPY sql/ sql/
COPY config/ config/
COPY systemd/ systemd/
RUN python -m build --wheel --outdir /dist .

FROM ${PYTHON_IMAGE}
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bmsd
USER bmsd
# Configuration: a file mounted at /etc/bmsd/bmsd.toml (found by itself),
# the BMSD_* environment, and passwords from files ([database]/[mqtt]
# password_file, e.g. Docker secrets under /run/secrets).
ENV BMSD_METRICS_ADDR=0.0.0.0:29108 \
    PYTHONUNBUFFERED=1
EXPOSE 29108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:29108/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["bmsd"]
CMD ["run"]
