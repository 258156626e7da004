"""``hopscope up``, ``down`` and ``status``: the cluster's lifecycle."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mesh.cli._client import APIClient, state_dir
from mesh.runtime.processes import pid_alive, tail

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

DEFAULT_MANIFESTS = Path(__file__).resolve().parents[2] / "apps" / "manifests"
"""The sample "shop" cluster, used when ``-f`` is not given."""


def _validate(paths: list[Path]) -> None:
    from mesh.model.manifests import ManifestError, load_manifests

    try:
        load_manifests(paths, warn=lambda line: console.print(f"warning: {line}", markup=False))
    except ManifestError as exc:
        raise click.ClickException(f"invalid manifests, nothing started:\n{exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot read manifests: {exc}") from None


@click.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Manifest file or directory (repeatable). Default: the sample shop cluster.",
)
@click.option(
    "-d", "--detach", is_flag=True, help="Run in the background; return once everything is ready."
)
@click.option(
    "--timeout",
    default=90.0,
    show_default=True,
    help="Seconds to wait for the cluster to be ready.",
)
@click.option(
    "--trace-store-budget",
    "budget",
    metavar="SIZE",
    callback=lambda _ctx, _param, value: _budget(value),
    help="Memory the embedded trace store may use, e.g. 256MiB or 64MB; the oldest traces "
    "are evicted beyond it. Default: $HOPSCOPE_TRACE_STORE_BUDGET, else 256MiB.",
)
@click.option(
    "--otlp-endpoint",
    "otlp_endpoint",
    metavar="URL",
    default=None,
    help="Also send every component's traces, logs and metrics to this OTLP/HTTP endpoint "
    "(e.g. http://127.0.0.1:4318), as well as to the embedded store. "
    "Default: $OTEL_EXPORTER_OTLP_ENDPOINT; headers from $OTEL_EXPORTER_OTLP_HEADERS.",
)
@click.option(
    "--dataplane",
    type=click.Choice(["auto", "kernel", "userspace"]),
    default=lambda: os.environ.get("HOPSCOPE_DATAPLANE", "auto"),
    show_default="auto, or $HOPSCOPE_DATAPLANE",
    help="kernel: nodes and pods are network namespaces; kube-proxy's iptables rules, "
    "conntrack, the bridge and VXLAN are the kernel's (Linux; root, or rootless in a user "
    "namespace). userspace: kube-proxy and the overlay are relay processes, nodes and pods "
    "share the host's network. auto: kernel where the host allows it, else userspace "
    "(saying why).",
)
def up(
    paths: tuple[Path, ...],
    detach: bool,
    timeout: float,
    budget: int | None,
    otlp_endpoint: str | None,
    dataplane: str,
) -> None:
    """Start the local cluster: pods with Envoy sidecars, ingress, kube-proxy, DNS, trace store."""
    manifests = [p.resolve() for p in paths] or [DEFAULT_MANIFESTS]
    if dataplane != "userspace":
        from mesh.kernel.topology import kernel_support

        reason = kernel_support()
        if reason:
            asked = "--dataplane kernel cannot run here" if dataplane == "kernel" else "auto"
            console.print(
                f"[yellow]{asked} ({reason}): using the userspace data path[/]",
                markup=True,
                soft_wrap=True,
            )
            dataplane = "userspace"
        else:
            dataplane = "kernel"
    _validate(manifests)
    _forwarding_env(otlp_endpoint)
    client = APIClient()
    if client.running():
        raise click.ClickException(
            "a hopscope cluster is already running "
            "(`hopscope status`; stop it with `hopscope down`)"
        )
    home = state_dir()
    if dataplane == "kernel":
        # The control plane runs in the cluster host's namespace, with the kernel address
        # plan: always as a child process, waited for in the foreground unless --detach.
        # In the foreground, Ctrl-C stops the cluster from the moment it is being started.
        stop = None if detach else _stop_on_signals()
        proc = _spawn(manifests, home, timeout, client, budget, dataplane, stop)
        if stop is not None:
            _wait_child(proc, stop)
    elif detach:
        _spawn(manifests, home, timeout, client, budget, dataplane)
    else:
        _up_foreground(manifests, home, timeout, budget)


def _forwarding_env(option: str | None) -> None:
    """Tell the control plane (our child, or this process in the foreground) where to
    forward: ``--otlp-endpoint``, else the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    from mesh.otlp.forward import check_endpoint, parse_headers
    from mesh.otlp.pipeline import FORWARD_ENDPOINT, FORWARD_HEADERS, LOGS_ENV

    endpoint = option or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    headers = os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", "")
    if not endpoint.strip():
        for name in (FORWARD_ENDPOINT, FORWARD_HEADERS, LOGS_ENV):
            os.environ.pop(name, None)
        return
    source = "--otlp-endpoint" if option else "OTEL_EXPORTER_OTLP_ENDPOINT"
    try:
        os.environ[FORWARD_ENDPOINT] = check_endpoint(endpoint)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=source) from None
    try:
        parse_headers(headers)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="OTEL_EXPORTER_OTLP_HEADERS") from None
    os.environ[FORWARD_HEADERS] = headers
    os.environ[LOGS_ENV] = "1"  # components ship their log records to the receiver too


def _budget(value: str | None) -> int | None:
    """The ``--trace-store-budget`` in bytes (None: the control plane's env or default)."""
    from mesh.tracestore.store import budget_from_env, parse_budget

    try:
        return parse_budget(value) if value else budget_from_env()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def controlplane_argv(
    manifests: list[Path], home: Path, budget: int | None, dataplane: str = "userspace"
) -> list[str]:
    """The command ``up --detach`` runs the control plane with (``python -m mesh.controlplane``)."""
    argv = [sys.executable, "-m", "mesh.controlplane", "--state-dir", str(home), "--schema-checked"]
    if dataplane != "userspace":
        argv += ["--dataplane", dataplane]
    if budget:
        argv += ["--trace-store-budget", str(budget)]
    for path in manifests:
        argv += ["-f", str(path)]
    return argv


def _spawn(
    manifests: list[Path],
    home: Path,
    timeout: float,
    client: APIClient,
    budget: int | None,
    dataplane: str = "userspace",
    stop: threading.Event | None = None,
) -> subprocess.Popen[bytes]:
    """Start the control plane as a background process; return once the cluster is ready.
    Interrupted meanwhile (Ctrl-C, or ``stop`` set), it stops what it started."""
    log_path = home / "controlplane.log"
    argv = controlplane_argv(manifests, home, budget, dataplane)
    env = dict(os.environ)
    if dataplane == "kernel":
        env["HOPSCOPE_ADDRESS_PLAN"] = "kernel"
        if os.geteuid() != 0:  # in a user namespace of its own, below the port broker
            from mesh.kernel.rootless import runner_argv

            argv = runner_argv(home, argv)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + timeout
    try:
        with console.status("starting the cluster…") as spinner:
            while time.monotonic() < deadline:
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                if proc.poll() is not None:
                    raise click.ClickException(
                        f"the control plane exited ({proc.returncode}):\n{tail(log_path)}"
                    )
                status = _status_or_none(client)
                if status is not None:
                    spinner.update(f"starting the cluster… {status['summary']}")
                    if status["ready"]:
                        _print_ready(status, home)
                        return proc
                time.sleep(0.2)
    except KeyboardInterrupt:
        console.print("interrupted: stopping the cluster…")
        _stop_child(proc)
        raise click.ClickException("interrupted while starting; the cluster was stopped") from None
    proc.terminate()
    raise click.ClickException(
        f"cluster not ready after {timeout:.0f}s; stopped it. Log: {log_path}"
    )


def _stop_on_signals() -> threading.Event:
    """An event Ctrl-C (SIGINT) or SIGTERM sets, instead of interrupting wherever we are."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Stop the control plane (it stops everything it started), killing it after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_child(proc: subprocess.Popen[bytes], stop: threading.Event) -> None:
    """Stay in the foreground while the control plane runs; Ctrl-C (or SIGTERM) stops it."""
    console.print("[dim]Ctrl-C stops the cluster.[/]")
    while not stop.is_set() and proc.poll() is None:
        stop.wait(0.5)
    if proc.poll() is not None:
        raise click.ClickException(f"the control plane exited ({proc.returncode})")
    console.print("stopping the cluster…")
    _stop_child(proc)
    console.print("stopped.")


def _status_or_none(client: APIClient) -> dict[str, Any] | None:
    if not client.running():
        return None
    try:
        return client.get("/api/v1/status")  # type: ignore[no-any-return]
    except click.ClickException:
        return None


def _up_foreground(manifests: list[Path], home: Path, timeout: float, budget: int | None) -> None:
    from mesh.controlplane.server import ControlPlane, StartupError
    from telemetry.logs import setup_json_logging

    log_path = home / "controlplane.log"
    setup_json_logging({"component": "controlplane"})
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().handlers[:] = [handler]
    plane = ControlPlane(manifests, home, schema_checked=True, trace_store_budget=budget)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    (home / "controlplane.pid").write_text(str(os.getpid()))
    try:
        with console.status("starting the cluster…") as spinner:
            plane.start(progress=lambda m: spinner.update(f"starting the cluster… {m}"))
            plane.wait_ready(
                timeout, progress=lambda m: spinner.update(f"starting the cluster… {m}")
            )
        _print_ready(plane.status(), home)
        console.print("[dim]Ctrl-C stops the cluster.[/]")
        stop.wait()
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        console.print("stopping the cluster…")
        plane.shutdown()
        (home / "controlplane.pid").unlink(missing_ok=True)
        console.print("stopped.")


def _print_ready(status: dict[str, Any], home: Path) -> None:
    from mesh.apiclient import read_token

    took = (status["ready_at"] or time.time()) - status["started_at"]
    console.print(f"[green]cluster ready[/] in {took:.1f}s: {status['summary']}")
    console.print(f"  ingress     {status['ingress']}  (Host: shop.local)")
    token = read_token(home)
    # like Jupyter: the URL with the token signs the browser in (a same-site session cookie)
    login = f"login?token={token}" if token else ""
    console.print(f"  explorer    {status['api']}/{login}", soft_wrap=True)
    forward = (status.get("otlp_receiver") or {}).get("forward_endpoint")
    if forward:
        console.print(f"  telemetry   also sent to {forward} (traces, logs, metrics)")
    console.print("  try         hopscope curl http://shop.local/   then   hopscope trace --last")


@click.command()
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait before killing.")
def down(timeout: float) -> None:
    """Stop the local cluster and every process it started."""
    home = state_dir()
    pid = _running_pid(home)
    if pid is None:
        console.print("no hopscope cluster is running.")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise click.ClickException(
            f"the running cluster (pid {pid}) belongs to another user; stop it as that user"
        ) from None
    deadline = time.monotonic() + timeout
    with console.status(f"stopping the cluster (pid {pid})…"):
        while pid_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        console.print(f"[yellow]control plane did not stop in {timeout:.0f}s; killed it[/]")
    _wait_for_broker(home)
    (home / "controlplane.pid").unlink(missing_ok=True)
    console.print("cluster stopped.")


def _wait_for_broker(home: Path, timeout: float = 10.0) -> None:
    """A rootless cluster's port broker exits once it has cleared the cluster's user
    namespace; wait for that, so nothing of the cluster runs when ``down`` returns."""
    from mesh.kernel.rootless import broker_pid

    pid = broker_pid(home)
    deadline = time.monotonic() + timeout
    while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)


def _running_pid(home: Path) -> int | None:
    client = APIClient()
    if client.running():
        try:
            return int(client.get("/api/v1/status")["pid"])
        except (click.ClickException, KeyError, ValueError):
            pass
    pidfile = home / "controlplane.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
def status(output: str, as_json: bool) -> None:
    """Show whether the cluster runs and which components and pods are ready."""
    st = APIClient().get("/api/v1/status")
    if as_json or output == "json":
        out.print_json(json.dumps(st))
        return
    table = Table("COMPONENT", "READY", "PID", "RESTARTS", box=None)
    for c in st["components"]:
        table.add_row(
            c["name"], "yes" if c["ready"] else "[red]no[/]", str(c["pid"]), str(c["restarts"])
        )
    out.print(
        f"cluster: {'[green]ready[/]' if st['ready'] else '[yellow]starting[/]'} — {st['summary']}"
    )
    out.print(table)
    out.print(f"api {st['api']} · ingress {st['ingress']}")
    if st.get("trace_store"):
        out.print(_store_line(st["trace_store"]))
    for pod, err in st["pod_errors"].items():
        out.print(f"[red]pod {pod} failed to start:[/] {err}")


def _store_line(store: dict[str, Any]) -> str:
    """``trace store: 1,234 traces (40,120 spans), 31.2 MiB of 256 MiB; back to 14:02:11``."""
    from mesh.tracestore.store import format_size

    line = (
        f"trace store: {store['traces']:,} traces ({store['spans']:,} spans), "
        f"{format_size(store['bytes'])} of {format_size(store['budget_bytes'])}"
    )
    if store["oldest_start_ns"]:
        oldest = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(store["oldest_start_ns"] / 1e9))
        line += f"; reaches back to {oldest}"
    if store["evicted_traces"]:
        line += f" ({store['evicted_traces']:,} older traces evicted)"
    return line
