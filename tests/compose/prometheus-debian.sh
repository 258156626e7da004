#!/bin/sh
# Entrypoint of the test-only Prometheus image (Debian bookworm's Prometheus 2.42): the
# compose file's config is written for Prometheus 3, whose `scrape_protocols` setting 2.42
# does not know. 2.42 asks for OpenMetrics first on its own, so dropping that one line keeps
# what the setting is for; everything else in the config is used as it is.
set -eu
src=/etc/prometheus/prometheus.yml
dir=$(mktemp -d)
grep -v '^[[:space:]]*scrape_protocols:' "$src" > "$dir/prometheus.yml"
for f in /etc/prometheus/*; do
  [ "$f" = "$src" ] || ln -s "$f" "$dir/"
done
exec /usr/bin/prometheus --config.file="$dir/prometheus.yml" "$@"
