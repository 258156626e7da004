"""Is the cluster keeping up with the asked rate, and which component is the busiest?

The traffic generator is open-model: it keeps sending at the asked rate whatever the
cluster does, so when the cluster falls behind, requests queue and their latency is mostly
waiting. That is the playground's capacity, not Kubernetes' behaviour, and the user must be
told so while it happens — with the component that burns the most CPU (read from /proc for
every process under the control plane: the same machine in local mode; in compose, the
processes of the control-plane container).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

KEEP_UP_RATIO = 0.9
"""Completions below this share of the asked rate (over a window) mean the cluster lags."""

WINDOW_S = 2.0
"""How often the live check looks (seconds of traffic per judgement)."""

WARMUP_S = 2.0
"""No judgement before this much traffic: the first requests open connections and caches."""

_MODULES = {
    "mesh.controlplane": "control plane",
    "mesh.kubeproxy": "kube-proxy",
    "mesh.cni.internet": "internet",
    "mesh.cni": "cni",
    "mesh.dns": "cluster-dns",
}


def component_of(cmdline: list[str]) -> str:
    """The cluster component a process belongs to, from its command line."""
    if not cmdline:
        return "other"
    exe = cmdline[0].rsplit("/", 1)[-1]
    if exe == "envoy":
        return "envoy"
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "-m":
            module = cmdline[i + 1]
            for prefix, name in _MODULES.items():
                if module == prefix or module.startswith(prefix + "."):
                    return name
            if module.startswith("apps."):
                return module.split(".", 1)[1]  # the sample app's name
            return module
    return exe


@dataclass
class CPUWatch:
    """CPU seconds used by each component of the process tree under ``root_pid``."""

    root_pid: int
    _last: dict[str, float] = field(default_factory=dict)
    _last_at: float = 0.0
    _first: dict[str, float] = field(default_factory=dict)
    _first_at: float = 0.0

    def totals(self) -> dict[str, float]:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        used: dict[str, float] = {}
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    name = component_of(proc.cmdline())
            except psutil.Error:
                continue  # gone meanwhile (a pod restarted)
            used[name] = used.get(name, 0.0) + times.user + times.system
        return used

    def start(self) -> None:
        self._first = self._last = self.totals()
        self._first_at = self._last_at = time.monotonic()

    def window(self) -> dict[str, float]:
        """Cores used per component since the previous call."""
        now, totals = time.monotonic(), self.totals()
        cores = _rates(self._last, totals, now - self._last_at)
        self._last, self._last_at = totals, now
        return cores

    def whole_run(self) -> dict[str, float]:
        """Cores used per component since :meth:`start`."""
        return _rates(self._first, self.totals(), time.monotonic() - self._first_at)


def _rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    if seconds <= 0:
        return {}
    cores = {k: max(0.0, v - before.get(k, 0.0)) / seconds for k, v in after.items()}
    return dict(sorted(cores.items(), key=lambda kv: kv[1], reverse=True))


def lag_warning(asked_rps: float, achieved_rps: float, cores: dict[str, float]) -> str | None:
    """One line when completions fall short of the asked rate, naming the busiest component."""
    if asked_rps <= 0 or achieved_rps >= KEEP_UP_RATIO * asked_rps:
        return None
    busiest = next(iter(cores.items()), None)
    who = f"; busiest: {busiest[0]} at {busiest[1]:.2f} cores" if busiest else ""
    return (
        f"the cluster is not keeping up: {achieved_rps:.0f} of {asked_rps:g} req/s completed "
        f"— latency is mostly queueing in the playground, not Kubernetes{who}"
    )


@dataclass
class LiveJudge:
    """Judges the completion rate every :data:`WINDOW_S` seconds while traffic runs."""

    asked_rps: float
    watch: CPUWatch | None
    warning: str | None = None
    warned: bool = False
    _done: int = 0
    _at: float = field(default_factory=time.monotonic)
    _started: float = field(default_factory=time.monotonic)

    def update(self, done: int) -> str | None:
        """Feed the completion count; returns a new warning the first time the cluster lags."""
        now = time.monotonic()
        if now - self._at < WINDOW_S:
            return None
        rate = (done - self._done) / (now - self._at)
        cores = self.watch.window() if self.watch else {}
        self._done, self._at = done, now
        if now - self._started < WARMUP_S:
            return None
        self.warning = lag_warning(self.asked_rps, rate, cores)
        if self.warning and not self.warned:
            self.warned = True
            return self.warning
        return None
