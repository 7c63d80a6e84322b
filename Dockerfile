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
    && groupadd --system --gid 10001 bmsd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin bmsd \
    && mkdir -p /etc/bmsd \
    && printf '[metrics]\naddr = "0.0.0.0:29108"\n' > /etc/bmsd/bmsd.toml
# The image's own /etc/bmsd/bmsd.toml just above: metrics on every interface,
# for Prometheus. A file mounted there replaces it (its [metrics] addr is
# then the one in effect); BMSD_METRICS_ADDR overrides either.
# A number, not a name: Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# Configuration: a file mounted at /etc/bmsd/bmsd.toml (found by itself),
# the BMSD_* environment, and passwords from files ([database]/[mqtt]
# password_file, e.g. Docker secrets under /run/secrets).
ENV PYTHONUNBUFFERED=1
EXPOSE 29108
# `bmsd probe` reads the same configuration as `bmsd run`, so it asks the
# address the daemon listens on, whatever the file or BMSD_METRICS_ADDR say.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["bmsd", "probe", "readyz"]
ENTRYPOINT ["bmsd"]
CMD ["run"]
