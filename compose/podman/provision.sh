#!/usr/bin/env bash
# Provision rootful Podman as a Docker-compatible engine on a Debian machine (CI and tests).
#
#   compose/podman/provision.sh            install podman, configure it, start the API socket
#
# Prints the DOCKER_HOST to use. Idempotent. Needs root and Debian's apt.
set -euo pipefail

SOCK=/run/podman/podman.sock
if [[ $(id -u) != 0 ]]; then
  echo "provision.sh needs root (rootful Podman)" >&2
  exit 1
fi
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "installing podman, runc, debootstrap…" >&2
  if ! apt-get install -y --no-install-recommends podman runc debootstrap >/dev/null 2>&1; then
    apt-get update >/dev/null
    apt-get install -y --no-install-recommends podman runc debootstrap >/dev/null
  fi
fi

nofile=$(ulimit -Hn)
[[ "$nofile" == unlimited || "$nofile" -gt 20000 ]] && nofile=20000
mkdir -p /etc/containers
cat > /etc/containers/containers.conf <<CONF
# hopscope: rootful Podman as a Docker-compatible engine on a machine without systemd.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
# No registry is reachable: block them all, so nothing ever tries to pull.
cat > /etc/containers/registries.conf <<'CONF'
unqualified-search-registries = []
[[registry]]
location = "docker.io"
blocked = true
[[registry]]
location = "quay.io"
blocked = true
[[registry]]
location = "ghcr.io"
blocked = true
[[registry]]
location = "registry.k8s.io"
blocked = true
CONF
[[ -f /etc/containers/policy.json ]] || cat > /etc/containers/policy.json <<'CONF'
{"default": [{"type": "insecureAcceptAnything"}]}
CONF

# Podman's CNI bridge masquerades traffic to any address outside the bridge's subnet;
# with br_netfilter on, that catches pod → node-routed traffic (Service VIPs, the other
# node's pods) on the bridge itself and hides the pod's address. Docker does not.
sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true

# Start a daemon with no file descriptor but stdio: run under `flock FILE …` (as the tests
# are), an inherited lock descriptor would keep that lock held for as long as it runs. And in
# /: a daemon left in the caller's directory (a checkout the tests run in) breaks once that
# directory is deleted — Podman's conmon then fails every container start with
# "write child: broken pipe".
daemon() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [[ $fd -gt 2 ]] && eval "exec $fd>&-"
    done
    cd /
    exec setsid "$@" </dev/null >/dev/null 2>&1
  ) &
}

if ! curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; then
  mkdir -p "$(dirname "$SOCK")"
  daemon sh -c "exec podman system service --time=0 unix://$SOCK >/var/log/podman-service.log 2>&1"
  for _ in $(seq 1 50); do
    curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.2
  done
fi
curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null

# Podman runs healthchecks from systemd timers; without systemd nothing runs them, and
# `depends_on: condition: service_healthy` would wait forever. Tick them ourselves.
if ! pgrep -f hopscope-healthcheck-ticker >/dev/null; then
  daemon bash -c 'exec -a hopscope-healthcheck-ticker bash -c "
    while true; do
      for id in \$(podman ps -q --filter health=starting --filter health=unhealthy --filter health=healthy 2>/dev/null); do
        podman healthcheck run \$id >/dev/null 2>&1 || true
      done
      sleep 2
    done"'
fi
echo "unix://$SOCK"
