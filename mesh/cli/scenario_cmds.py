"""``hopscope scenario list | run NAME | reset``: break something, then let telemetry find it."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from mesh.cli._client import APIClient

out = Console()
err = Console(stderr=True)


@click.group()
def scenario() -> None:
    """Break-it scenarios with an automatic check that the telemetry shows the culprit."""


@scenario.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the scenarios as JSON.")
def list_(as_json: bool) -> None:
    """The scenarios, with what each breaks and what to look for."""
    from mesh.scenarios import SCENARIOS

    described = [cls().describe() for cls in SCENARIOS.values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    table = Table("scenario", "what it breaks", box=None)
    for d in described:
        table.add_row(d["name"], f"{d['title']}\n[dim]{d['breaks']}[/]")
    out.print(table)
    out.print("run one with `hopscope scenario run NAME`; `--json` for the full texts")


@scenario.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(name: str, as_json: bool) -> None:
    """Break, send traffic, check the telemetry names the culprit, restore.

    Exits 1 when the telemetry does not show the culprit.
    """
    from mesh.scenarios import SCENARIOS, ScenarioError
    from mesh.scenarios import run as run_scenario

    if name not in SCENARIOS:
        raise click.ClickException(
            f"unknown scenario {name!r}; `hopscope scenario list` shows: {', '.join(SCENARIOS)}"
        )
    APIClient().get("/api/v1/status")  # a clear error when no cluster runs
    if not as_json:
        d = SCENARIOS[name]().describe()
        out.print(f"[bold]{d['name']}[/] — {d['title']}\n{d['story']}\n")

    def progress(message: str) -> None:
        if not as_json:
            err.print(f"[dim]· {message}[/]")

    try:
        result = run_scenario(name, progress)
    except ScenarioError as exc:
        raise click.ClickException(f"scenario {name} could not run: {exc}") from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        out.print("\n[bold]look for:[/]")
        for item in result["look_for"]:
            out.print(f"  • {item}")
        if result["dashboard"]:
            out.print(f"  • Grafana (compose): the “{result['dashboard']}” dashboard")
        for line in result["evidence"][:8]:
            out.print(f"  [dim]{line}[/]")
        for trace_id in result["trace_ids"][:3]:
            out.print(f"  trace: hopscope trace {trace_id}")
        mark = "[green]PASS[/]" if result["ok"] else "[red]FAIL[/]"
        out.print(f"\nverdict {mark}: {result['verdict']}")
    if not result["ok"]:
        raise SystemExit(1)


@scenario.command()
@click.option("--json", "as_json", is_flag=True, help="Print what was restored as JSON.")
def reset(as_json: bool) -> None:
    """Restore the healthy sample cluster (shipped manifests, readiness, kube-proxy, lab)."""
    from mesh.scenarios import ScenarioError
    from mesh.scenarios import reset as reset_cluster

    APIClient().get("/api/v1/status")
    try:
        done = reset_cluster(lambda m: None if as_json else err.print(f"[dim]· {m}[/]"))
    except ScenarioError as exc:
        raise click.ClickException(f"reset incomplete: {exc}") from None
    if as_json:
        click.echo(json.dumps({"ok": True, "changes": done}, indent=2))
    else:
        for line in done:
            out.print(line)
        out.print("[green]cluster restored[/]")
