# Aether node image: slim, runs as an unprivileged user, state in one volume.
#   docker build -t aether .
#   docker run --rm -v aether-data:/var/lib/aether -p 7000:7000 -p 9000:9000 -p 8080:8080 \
#       -e AETHER_LIVEZ=https://127.0.0.1:9000/livez -v $PWD/node-1:/etc/aether:ro aether
# where node-1/ holds the node's aether.toml, tls/ (ca.crt, node-1.crt, node-1.key) and api-key.
# See docs/operations.md (configuration, certificates, keys) and ops/kubernetes/aether.yaml.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN groupadd --system --gid 10001 aether \
    && useradd --system --uid 10001 --gid aether --home-dir /var/lib/aether --create-home aether \
    && mkdir -p /etc/aether \
    && chown aether:aether /var/lib/aether
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/aether_slices-*.whl \
    && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    AETHER_REPOSITORY=/var/lib/aether/repository
USER 10001:10001
WORKDIR /var/lib/aether
VOLUME ["/var/lib/aether"]
# cluster port, management API (probes: /livez, /readyz), HTTP router
EXPOSE 7000 9000 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import os, ssl, urllib.request; urllib.request.urlopen(os.environ.get('AETHER_LIVEZ', 'http://127.0.0.1:9000/livez'), timeout=2, context=ssl._create_unverified_context())"]
ENTRYPOINT ["aether", "node"]
CMD ["--config", "/etc/aether/aether.toml", "--api-key-file", "/etc/aether/api-key", "--host", "0.0.0.0", "--data-dir", "/var/lib/aether/data"]
