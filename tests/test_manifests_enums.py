"""Enumerated manifest fields are checked at load time, like the API server checks them.

The OpenAPI schemas leave enums to prose, so before this check ``type: NodePortz`` loaded.
Each case below puts one bad value into an otherwise valid object and expects one line naming
the file, the object and the field, with the accepted values.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.model.manifests import ManifestError, load_manifests
from mesh.model.types import (
    ClusterState,
    PathType,
    Protocol,
    Service,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)

CONTAINER = {
    "name": "web",
    "image": "demo",
    "command": ["python", "-m", "http.server"],
    "ports": [{"name": "http", "containerPort": 8000}],
    "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
}
POD_TEMPLATE = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [CONTAINER]}}

BASE: dict[str, dict[str, Any]] = {
    "Service": {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x", "namespace": "shop"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]},
    },
    "Deployment": {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": POD_TEMPLATE},
    },
    "StatefulSet": {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "web"}},
            "template": POD_TEMPLATE,
        },
    },
    "Ingress": {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": "x", "port": {"number": 80}}},
                            }
                        ]
                    }
                }
            ]
        },
    },
    "NetworkPolicy": {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "np", "namespace": "shop"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}],
        },
    },
}

WHO = {
    "Service": "Service shop/x",
    "Deployment": "Deployment shop/web",
    "StatefulSet": "StatefulSet shop/db",
    "Ingress": "Ingress shop/shop",
    "NetworkPolicy": "NetworkPolicy shop/np",
}

TEMPLATE = "spec.template.spec"
C0 = f"{TEMPLATE}.containers[0]"
EXPR = {"key": "app", "operator": "Within", "values": ["web"]}

# (kind, field path, bad value, accepted values as the message lists them)
CASES: list[tuple[str, str, Any, str]] = [
    ("Service", "spec.type", "NodePortz", "ClusterIP, NodePort, LoadBalancer, ExternalName"),
    ("Service", "spec.sessionAffinity", "clientip", "ClientIP, None"),
    ("Service", "spec.externalTrafficPolicy", "Global", "Cluster, Local"),
    ("Service", "spec.internalTrafficPolicy", "Node", "Cluster, Local"),
    ("Service", "spec.ipFamilyPolicy", "DualStack", "SingleStack, PreferDualStack, "),
    ("Service", "spec.ipFamilies[0]", "IPv5", "IPv4, IPv6"),
    ("Service", "spec.ports[0].protocol", "HTTP", "TCP, UDP, SCTP"),
    ("Ingress", "spec.rules[0].http.paths[0].pathType", "Regex", "Exact, Prefix, Implementation"),
    ("NetworkPolicy", "spec.policyTypes[0]", "ingress", "Ingress, Egress"),
    ("NetworkPolicy", "spec.ingress[0].ports[0].protocol", "ICMP", "TCP, UDP, SCTP"),
    ("Deployment", "spec.strategy.type", "BlueGreen", "Recreate, RollingUpdate"),
    ("Deployment", f"{TEMPLATE}.restartPolicy", "Never", "Always"),
    ("Deployment", f"{TEMPLATE}.dnsPolicy", "ClusterLast", "ClusterFirstWithHostNet, "),
    ("Deployment", f"{C0}.imagePullPolicy", "Sometimes", "Always, Never, IfNotPresent"),
    ("Deployment", f"{C0}.ports[0].protocol", "tcp", "TCP, UDP, SCTP"),
    ("Deployment", f"{C0}.readinessProbe.httpGet.scheme", "FTP", "HTTP, HTTPS"),
    ("Deployment", f"{C0}.terminationMessagePolicy", "Stdout", "File, FallbackToLogsOnError"),
    ("StatefulSet", "spec.podManagementPolicy", "Random", "OrderedReady, Parallel"),
    ("StatefulSet", "spec.updateStrategy.type", "Recreate", "RollingUpdate, OnDelete"),
    ("StatefulSet", f"{C0}.imagePullPolicy", "Maybe", "Always, Never, IfNotPresent"),
]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b[0].c`` in ``doc``, creating mappings and one-item lists on the way."""
    node: Any = doc
    parts = path.replace("]", "").replace("[", ".").split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt = parts[i + 1] if not last else None
        if part.isdigit():
            index = int(part)
            while len(node) <= index:
                node.append({})
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, [] if nxt and nxt.isdigit() else {})


def _write(tmp_path: Path, *docs: dict[str, Any]) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


@pytest.mark.parametrize("kind", sorted(BASE))
def test_the_base_objects_are_valid(tmp_path: Path, kind: str) -> None:
    load_manifests([_write(tmp_path, BASE[kind])])


@pytest.mark.parametrize(("kind", "field", "value", "accepted"), CASES)
def test_a_value_outside_the_enum_is_refused(
    tmp_path: Path, kind: str, field: str, value: Any, accepted: str
) -> None:
    doc = copy.deepcopy(BASE[kind])
    _set(doc, field, value)
    with pytest.raises(ManifestError) as err:
        load_manifests([_write(tmp_path, doc)])
    message = str(err.value)
    assert message.startswith(f"bad.yaml: {WHO[kind]}: {field}: {value!r} is not one of "), message
    assert accepted in message and "\n" not in message


def test_the_issue_example_reads_exactly(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE["Service"])
    doc["spec"]["type"] = "NodePortz"
    with pytest.raises(ManifestError) as err:
        load_manifests([_write(tmp_path, doc)])
    assert str(err.value) == (
        "bad.yaml: Service shop/x: spec.type: 'NodePortz' is not one of "
        "ClusterIP, NodePort, LoadBalancer, ExternalName"
    )


def test_selector_operators_are_checked_everywhere(tmp_path: Path) -> None:
    for kind, field in [
        ("NetworkPolicy", "spec.podSelector.matchExpressions"),
        ("NetworkPolicy", "spec.ingress[0].from[0].podSelector.matchExpressions"),
        ("Deployment", "spec.selector.matchExpressions"),
    ]:
        doc = copy.deepcopy(BASE[kind])
        _set(doc, field, [EXPR])
        with pytest.raises(ManifestError, match=re.escape(f"{field}[0].operator: 'Within' is")):
            load_manifests([_write(tmp_path, doc)])


@pytest.mark.parametrize(
    ("kind", "field", "value", "reason"),
    [
        ("Service", "spec.internalTrafficPolicy", "Local", "kube-proxy"),
        ("Service", "spec.ipFamilyPolicy", "RequireDualStack", "single-stack"),
        ("Service", "spec.ipFamilies[0]", "IPv6", "single-stack"),
        ("Deployment", f"{C0}.readinessProbe.httpGet.scheme", "HTTPS", "plain HTTP"),
    ],
)
def test_valid_values_hopscope_cannot_honour_are_refused_with_the_reason(
    tmp_path: Path, kind: str, field: str, value: str, reason: str
) -> None:
    doc = copy.deepcopy(BASE[kind])
    _set(doc, field, value)
    with pytest.raises(ManifestError) as err:
        load_manifests([_write(tmp_path, doc)])
    message = str(err.value)
    assert f"{field}: {value!r} is not supported by hopscope (" in message
    assert reason in message


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("http", True),
        ("kubernetes.io/h2c", True),
        ("example.com/my-protocol", True),
        ("HTTP/2", False),
        ("has space", False),
        ("a/b/c", False),
    ],
)
def test_app_protocol_is_free_form_but_a_qualified_name(
    tmp_path: Path, value: str, ok: bool
) -> None:
    doc = copy.deepcopy(BASE["Service"])
    doc["spec"]["ports"][0]["appProtocol"] = value
    path = _write(tmp_path, doc)
    if ok:
        (svc,) = load_manifests([path])
        assert isinstance(svc, Service) and svc.ports[0].app_protocol == value
        return
    with pytest.raises(ManifestError, match=r"spec\.ports\[0\]\.appProtocol: .* qualified name"):
        load_manifests([path])


def test_enum_fields_are_enums_in_the_model_and_strings_in_json(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE["Service"])
    doc["spec"].update(sessionAffinity="ClientIP", externalTrafficPolicy="Local")
    (svc,) = load_manifests([_write(tmp_path, doc)])
    assert isinstance(svc, Service)
    assert svc.type is ServiceType.NODE_PORT and svc.type == "NodePort"
    assert svc.session_affinity is SessionAffinity.CLIENT_IP
    assert svc.external_traffic_policy is TrafficPolicy.LOCAL
    assert svc.ports[0].protocol is Protocol.TCP
    state = ClusterState(services=[svc])
    data = json.loads(json.dumps(state.to_dict()))
    assert data["services"][0]["type"] == "NodePort"
    again = ClusterState.from_dict(data)
    assert again.services[0].type is ServiceType.NODE_PORT
    assert again.services[0].ports[0].protocol is Protocol.TCP


def test_ingress_path_type_is_an_enum(tmp_path: Path) -> None:
    (ing,) = load_manifests([_write(tmp_path, BASE["Ingress"])])
    assert ing is not None and ing.rules[0].paths[0].path_type is PathType.PREFIX


# -- fields hopscope accepts but does not act on: a warning naming them --------------------


@pytest.mark.parametrize(
    ("kind", "field", "value", "words"),
    [
        ("Deployment", f"{C0}.livenessProbe", {"tcpSocket": {"port": "http"}}, "process exits"),
        ("StatefulSet", f"{C0}.startupProbe", {"tcpSocket": {"port": "http"}}, "readinessProbe"),
        ("Deployment", f"{C0}.lifecycle", {"preStop": {"exec": {"command": ["true"]}}}, "preStop"),
        ("Service", "spec.ports[0].protocol", "UDP", "UDP is published in DNS but not proxied"),
        ("Service", "spec.ports[0].protocol", "SCTP", "kube-proxy forwards TCP only"),
    ],
)
def test_fields_hopscope_does_not_act_on_load_with_a_warning_naming_them(
    tmp_path: Path, kind: str, field: str, value: Any, words: str
) -> None:
    doc = copy.deepcopy(BASE[kind])
    _set(doc, field, value)
    warnings: list[str] = []
    (obj,) = load_manifests([_write(tmp_path, doc)], warn=warnings.append)
    assert obj is not None
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"bad.yaml: {WHO[kind]}: {field}: "), warnings
    assert words in warnings[0] and "\n" not in warnings[0]


def test_the_cluster_dns_service_udp_port_is_no_warning(tmp_path: Path) -> None:
    """kube-dns's UDP 53 is answered by the DNS server itself at the VIP, not proxied."""
    doc = copy.deepcopy(BASE["Service"])
    doc["metadata"] = {
        "name": "kube-dns",
        "namespace": "kube-system",
        "annotations": {"hopscope.dev/served-by": "cluster-dns"},
    }
    doc["spec"] = {
        "selector": {"k8s-app": "kube-dns"},
        "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ],
    }
    warnings: list[str] = []
    load_manifests([_write(tmp_path, doc)], warn=warnings.append)
    assert warnings == []


def test_the_shipped_manifests_load_without_warnings() -> None:
    root = Path(__file__).resolve().parents[1]
    warnings: list[str] = []
    for folder in ("apps/manifests", "tests/manifests", "mesh/scenarios/manifests"):
        assert load_manifests([root / folder], warn=warnings.append)
    assert warnings == []


def test_init_containers_are_refused_with_the_reason(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE["Deployment"])
    doc["spec"]["template"]["spec"]["initContainers"] = [
        {"name": "migrate", "image": "demo", "command": ["true"]}
    ]
    with pytest.raises(ManifestError) as err:
        load_manifests([_write(tmp_path, doc)])
    assert str(err.value).startswith(
        f"bad.yaml: Deployment shop/web: {TEMPLATE}.initContainers: not supported by hopscope: "
    )
    assert "does not run init containers" in str(err.value)


# -- schema-checked kinds word their enum errors like the core kinds ------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "default", "namespace": "shop"},
                "spec": {"mtls": {"mode": "STRICTX"}},
            },
            "bad.yaml: PeerAuthentication shop/default: spec.mtls.mode: 'STRICTX' is not one "
            "of UNSET, DISABLE, PERMISSIVE, STRICT",
        ),
        (
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "r", "namespace": "shop"},
                "spec": {"rules": [{"matches": [{"path": {"type": "PathPrefixx", "value": "/"}}]}]},
            },
            "bad.yaml: HTTPRoute shop/r: spec.rules[0].matches[0].path.type: 'PathPrefixx' "
            "is not one of Exact, PathPrefix",
        ),
    ],
)
def test_custom_kinds_list_enum_values_like_the_core_kinds(
    tmp_path: Path, doc: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ManifestError) as err:
        load_manifests([_write(tmp_path, doc)])
    assert str(err.value).startswith(expected), err.value
    assert "(" not in str(err.value).split("is not one of")[1]
    assert "[" not in str(err.value).split("is not one of")[1]


# -- `hopscope apply` checks every file before it sends any -------------------------------


def test_apply_validates_every_file_before_it_contacts_the_cluster(tmp_path: Path) -> None:
    """With no cluster at all: the old file-by-file loop posted a.yaml first and failed on
    the connection; now b.yaml's error comes first and nothing is sent."""
    from click.testing import CliRunner

    from mesh.cli import cli

    folder = tmp_path / "manifests"
    folder.mkdir()
    good = copy.deepcopy(BASE["Service"])
    good["metadata"]["name"] = "a"
    (folder / "a.yaml").write_text(yaml.safe_dump(good))
    bad = copy.deepcopy(BASE["Service"])
    bad["spec"]["type"] = "NodePortz"
    (folder / "b.yaml").write_text(yaml.safe_dump(bad))
    env = {"HOPSCOPE_HOME": str(tmp_path / "home")}
    for args in (["-f", str(folder)], ["-f", str(folder / "a.yaml"), "-f", str(folder / "b.yaml")]):
        result = CliRunner().invoke(cli, ["apply", *args], env=env)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert lines == [
            "Error: invalid manifest, nothing applied: b.yaml: Service shop/x: spec.type: "
            "'NodePortz' is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
        ], result.output
