# Prometheus from Debian's package, for engines that cannot pull prom/prometheus.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/*
COPY prometheus-debian.sh /usr/local/bin/prometheus-debian
USER nobody
ENTRYPOINT ["/usr/local/bin/prometheus-debian"]
