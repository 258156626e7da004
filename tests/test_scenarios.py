"""Every break-it scenario against the local cluster: its telemetry check must pass, and a
check that blames the wrong hop for the same fault must fail."""

from __future__ import annotations

import json

import pytest

from mesh.scenarios import SCENARIOS, BlameCheck, reset, run
from tests.e2e_support import dataplane, hopscope

pytestmark = pytest.mark.e2e


def test_list_describes_every_scenario(cluster: dict[str, str]) -> None:
    listed = json.loads(hopscope("scenario", "list", "--json", env=cluster).stdout)
    assert [s["name"] for s in listed] == list(SCENARIOS)
    for s in listed:
        assert s["story"] and s["breaks"] and s["traffic"] and s["look_for"], s["name"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_check_finds_the_culprit(cluster: dict[str, str], name: str) -> None:
    proc = hopscope("scenario", "run", name, "--json", env=cluster, timeout=240, check=False)
    if name == "cross-node-latency" and dataplane() == "kernel" and "netem" in proc.stderr:
        # the overlay delay is a netem qdisc there; a kernel without sch_netem cannot
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.stdout.strip(), f"exit {proc.returncode}, no result:\n{proc.stderr}"
    result = json.loads(proc.stdout)
    assert result["ok"], json.dumps(result, indent=2)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        # the fault is real, but the expectation blames the wrong hop: the check must say no
        ("no-endpoints", BlameCheck("app", "app", ("catalog",))),
        ("app-error", BlameCheck("sidecar-outbound", "proxy", ("503",))),
        ("dns-typo", BlameCheck("kube-proxy", "kube-proxy")),
    ],
)
def test_a_check_blaming_the_wrong_hop_fails(
    cluster: dict[str, str], name: str, wrong: BlameCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    # in this process, as the cluster's user: the scenario reads the API token from there
    monkeypatch.setenv("HOPSCOPE_HOME", cluster["HOPSCOPE_HOME"])
    result = run(name, blame=wrong)
    assert not result["ok"], result["verdict"]
    assert "0/" in result["verdict"]


def test_run_exits_non_zero_and_reset_restores(
    cluster: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOPSCOPE_HOME", cluster["HOPSCOPE_HOME"])  # reset() runs in-process
    bad = hopscope("scenario", "run", "no-such-thing", env=cluster, check=False)
    assert bad.returncode != 0 and "unknown scenario" in bad.stderr
    done = reset()
    assert "every shop pod ready" in done
    page = json.loads(hopscope("curl", "--json", "http://shop.local/", env=cluster).stdout)
    assert page["status"] == 200
