"""Gateway API objects: validation with field paths, attachment, and the Envoy routes rendered
from them (checked by the real Envoy's ``--mode validate``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mesh import addresses
from mesh.envoy import validate_config
from mesh.envoy.common import (
    bootstrap,
    http_connection_manager,
    http_listener,
    otlp_cluster,
    static_cluster,
)
from mesh.envoy.gateway import (
    gateway_resources,
    merge_virtual_hosts,
    mesh_backend_services,
    mesh_outbound_routes,
    mesh_routes,
    passthrough_attachments,
)
from mesh.envoy.ingress import ingress_resources
from mesh.envoy.sidecar import render_sidecar, service_cluster_name
from mesh.model import gateway_api
from mesh.model.controllers import Cluster
from mesh.model.manifests import (
    ManifestError,
    default_manifest_paths,
    load_document,
    load_manifests,
)
from mesh.model.types import ClusterState, Namespace, Service, ServicePort

OTLP = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
SCENARIOS = Path(__file__).parent.parent / "mesh" / "scenarios" / "manifests"
GW = "gateway.networking.k8s.io/v1"


def route(spec: dict[str, Any], name: str = "r", namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def gateway(listeners: list[dict[str, Any]], name: str = "gw", cls: str = "hopscope") -> Any:
    return load_document(
        {
            "apiVersion": GW,
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"gatewayClassName": cls, "listeners": listeners},
        },
        "test.yaml",
    )


GOOD = {
    "parentRefs": [{"name": "gw"}],
    "hostnames": ["shop.local"],
    "rules": [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
            "backendRefs": [
                {"name": "catalog-v1", "port": 8080, "weight": 90},
                {"name": "catalog-v2", "port": 8080, "weight": 10},
            ],
        }
    ],
}


def bad(change: str, value: Any) -> dict[str, Any]:
    """GOOD with the field at dotted path ``change`` set to ``value``."""
    spec = copy.deepcopy(GOOD)
    *parents, last = change.split(".")
    node: Any = spec
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (bad("rules.0.backendRefs.1.wieght", 3), "spec.rules[0].backendRefs[1]: Additional"),
        (bad("rules.0.backendRefs.1.weight", 2_000_000), "spec.rules[0].backendRefs[1].weight:"),
        (bad("rules.0.backendRefs.0.weight", -1), "spec.rules[0].backendRefs[0].weight:"),
        (bad("rules.0.backendRefs.0.kind", "Pod"), "spec.rules[0].backendRefs[0].kind: only Serv"),
        (bad("rules.0.backendRefs.0", {"name": "x"}), "spec.rules[0].backendRefs[0].port: requi"),
        (bad("rules.0.matches.0.path.value", "api"), "spec.rules[0].matches[0].path.value: must"),
        (bad("rules.0.matches.0.path.type", "Prefix"), "spec.rules[0].matches[0].path.type:"),
        (bad("hostnames", ["Shop_Local"]), "spec.hostnames[0]:"),
        (bad("rules.0.timeouts", {"request": "10 seconds"}), "spec.rules[0].timeouts.request:"),
        (
            bad("rules.0.timeouts", {"request": "1s", "backendRequest": "2s"}),
            "spec.rules[0].timeouts.backendRequest: cannot be longer than request",
        ),
        (bad("rules.0.retry", {"codes": [600]}), "spec.rules[0].retry.codes[0]:"),
        (bad("rules.0.retry", {"attempts": -1}), "spec.rules[0].retry.attempts:"),
        (
            bad("rules.0.filters", [{"type": "RequestRedirect", "requestRedirect": {}}]),
            "spec.rules[0].filters: RequestRedirect cannot be used with backendRefs",
        ),
        (
            bad("rules.0.filters", [{"type": "URLRewrite"}]),
            "spec.rules[0].filters[0].urlRewrite: required for type URLRewrite",
        ),
        (
            bad(
                "rules.0.filters",
                [
                    {
                        "type": "RequestMirror",
                        "requestMirror": {"backendRef": {"name": "v2", "port": 80}},
                        "urlRewrite": {},
                    }
                ],
            ),
            "spec.rules[0].filters[0].urlRewrite: must not be set for type RequestMirror",
        ),
        (bad("parentRefs.0.kind", "Pod"), "spec.parentRefs[0].kind: must be a Gateway or"),
    ],
)
def test_bad_routes_are_refused_with_the_field_path(spec: dict[str, Any], expected: str) -> None:
    load_document(route(GOOD), "test.yaml")  # the unchanged spec is valid
    with pytest.raises(ManifestError) as err:
        load_document(route(spec), "test.yaml")
    message = str(err.value)
    assert message.startswith("test.yaml: HTTPRoute shop/r: "), message
    assert expected in message, message
    assert "\n" not in message


def test_prefix_rewrite_needs_exactly_one_prefix_match() -> None:
    rule = {
        "matches": [{"path": {"value": "/a"}}, {"path": {"value": "/b"}}],
        "filters": [
            {
                "type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
            }
        ],
        "backendRefs": [{"name": "x", "port": 80}],
    }
    with pytest.raises(ManifestError, match=r"spec.rules\[0\].filters\[0\].urlRewrite.path: "):
        load_document(route({"rules": [rule]}), "t.yaml")


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ({"name": "a", "port": 443, "protocol": "HTTPS"}, "listeners[0].tls.certificateRefs"),
        ({"name": "a", "port": 80, "protocol": "HTTP", "tls": {}}, "listeners[0].tls: must not"),
        ({"name": "a", "port": 80, "protocol": "UDP"}, "listeners[0].protocol:"),
        ({"name": "a", "port": 0, "protocol": "HTTP"}, "listeners[0].port:"),
        ({"name": "a", "port": 80, "protocol": "TLS"}, "listeners[0].tls: required"),
        ({"name": "a", "port": 80, "protocol": "HTTP", "hostnme": "x"}, "listeners[0]: Addit"),
    ],
)
def test_bad_gateways_are_refused(listener: dict[str, Any], expected: str) -> None:
    with pytest.raises(ManifestError) as err:
        gateway([listener])
    assert f"Gateway shop/gw: spec.{expected}" in str(err.value)


def test_duplicate_listener_names_are_refused() -> None:
    listener = {"name": "web", "port": 80, "protocol": "HTTP"}
    with pytest.raises(ManifestError, match=r"spec.listeners\[1\].name: duplicate"):
        gateway([listener, {**listener, "port": 81}])


def test_grpc_method_match_needs_a_service_or_method() -> None:
    doc = {
        "apiVersion": GW,
        "kind": "GRPCRoute",
        "metadata": {"name": "g", "namespace": "shop"},
        "spec": {"rules": [{"matches": [{"method": {"type": "Exact"}}]}]},
    }
    with pytest.raises(ManifestError, match=r"spec.rules\[0\].matches\[0\].method: needs"):
        load_document(doc, "t.yaml")


# -- attachment -------------------------------------------------------------------------------


def _state(*objects: Any) -> ClusterState:
    state = ClusterState(namespaces=[Namespace("shop"), Namespace("web")])
    for i, name in enumerate(["frontend", "catalog", "catalog-v1", "catalog-v2"]):
        state.services.append(
            Service(
                name=name,
                namespace="shop",
                ports=[ServicePort(8080, 8080, name="http")],
                cluster_ip=f"127.96.0.{20 + i}",
            )
        )
    for obj in objects:
        kind = type(obj).__name__
        target = {
            "Gateway": state.gateways,
            "HTTPRoute": state.http_routes,
            "GRPCRoute": state.grpc_routes,
            "TLSRoute": state.tls_routes,
        }[kind]
        target.append(obj)
    return state


def _route(spec: dict[str, Any], name: str = "r", namespace: str = "shop", age: float = 0) -> Any:
    obj = load_document(route(spec, name, namespace), "t.yaml")
    obj.created = age
    return obj


@pytest.mark.parametrize(
    ("listener", "route_hosts", "expected"),
    [
        (None, [], ("*",)),
        (None, ["a.example.com"], ("a.example.com",)),
        ("a.example.com", [], ("a.example.com",)),
        ("*.example.com", ["a.example.com", "b.example.net"], ("a.example.com",)),
        ("*.example.com", ["example.com"], ()),
        ("*.example.com", ["x.y.example.com"], ("x.y.example.com",)),
        ("a.example.com", ["*.example.com"], ("a.example.com",)),
        ("*.example.com", ["*.a.example.com"], ("*.a.example.com",)),
    ],
)
def test_hostname_intersection(
    listener: str | None, route_hosts: list[str], expected: tuple[str, ...]
) -> None:
    assert gateway_api.intersect_hostnames(listener, tuple(route_hosts)) == expected


def test_listeners_accept_routes_by_section_port_and_namespace() -> None:
    gw = gateway(
        [
            {"name": "web", "port": 8080, "protocol": "HTTP", "hostname": "shop.local"},
            {
                "name": "open",
                "port": 9090,
                "protocol": "HTTP",
                "allowedRoutes": {"namespaces": {"from": "All"}},
            },
        ]
    )
    backend = [{"backendRefs": [{"name": "frontend", "port": 8080}]}]
    by_section = _route({"parentRefs": [{"name": "gw", "sectionName": "web"}], "rules": backend})
    by_port = _route({"parentRefs": [{"name": "gw", "port": 9090}], "rules": backend}, "p")
    other_ns = _route(
        {"parentRefs": [{"name": "gw", "namespace": "shop"}], "rules": backend}, "o", "web"
    )
    wrong_host = _route(
        {"parentRefs": [{"name": "gw", "sectionName": "web"}], "hostnames": ["x.local"]}, "w"
    )
    state = _state(gw, by_section, by_port, other_ns, wrong_host)
    seen = {
        (a.route.name, a.listener.name, a.hostnames)
        for a in gateway_api.gateway_attachments(state, gw)
    }
    assert seen == {
        ("r", "web", ("shop.local",)),
        ("p", "open", ("*",)),
        ("o", "open", ("*",)),  # Same-namespace "web" listener refuses it, "open" takes it
    }
    problems = gateway_api.route_problems(state)
    assert any("HTTPRoute shop/w: spec.parentRefs[0]: no listener" in p for p in problems)


def test_a_missing_backend_is_reported_and_its_share_answers_500() -> None:
    gw = gateway([{"name": "web", "port": 8080, "protocol": "HTTP"}])
    spec = {
        "parentRefs": [{"name": "gw"}],
        "rules": [
            {
                "backendRefs": [
                    {"name": "catalog-v1", "port": 8080, "weight": 3},
                    {"name": "catalog-v9", "port": 8080, "weight": 1},
                ]
            }
        ],
    }
    state = _state(gw, _route(spec))
    assert gateway_api.route_problems(state) == [
        "HTTPRoute shop/r: spec.rules[0].backendRefs[1]: Service shop/catalog-v9 not found "
        "(its share of the rule answers 500)"
    ]
    vhosts, clusters = gateway_resources(state)
    failing, forward = vhosts[0]["routes"]
    assert failing["direct_response"]["status"] == 500
    fraction = failing["match"]["runtime_fraction"]["default_value"]
    assert fraction == {"numerator": 250_000, "denominator": "MILLION"}
    assert forward["route"]["cluster"] == "gateway|shop|catalog-v1|8080"
    assert [c["name"] for c in clusters] == ["gateway|shop|catalog-v1|8080"]


def test_gateways_of_other_classes_are_not_served() -> None:
    gw = gateway([{"name": "web", "port": 8080, "protocol": "HTTP"}], cls="istio")
    state = _state(gw, _route(GOOD))
    assert gateway_resources(state) == ([], [])
    assert any("is not 'hopscope'" in p for p in gateway_api.route_problems(state))


def test_routes_follow_the_api_precedence() -> None:
    gw = gateway([{"name": "web", "port": 8080, "protocol": "HTTP"}])

    def rule(match: dict[str, Any]) -> dict[str, Any]:
        return {"matches": [match], "backendRefs": [{"name": "frontend", "port": 8080}]}

    older = _route(
        {
            "parentRefs": [{"name": "gw"}],
            "rules": [
                rule({"path": {"value": "/"}}),
                rule({"path": {"value": "/api"}}),
                rule({"path": {"value": "/api"}, "headers": [{"name": "X-V", "value": "2"}]}),
            ],
        },
        "older",
        age=1,
    )
    newer = _route(
        {
            "parentRefs": [{"name": "gw"}],
            "rules": [
                rule({"path": {"type": "Exact", "value": "/api/x"}}),
                rule({"path": {"value": "/api"}, "method": "POST"}),
                rule({"path": {"value": "/api/long"}}),
            ],
        },
        "newer",
        age=2,
    )
    vhosts, _ = gateway_resources(_state(gw, newer, older))
    order = [r["decorator"]["operation"] for r in vhosts[0]["routes"]]
    assert order == [
        "gateway shop/newer /api/x",
        "gateway shop/newer /api/long",
        "gateway shop/newer /api",  # the method match ranks first among equal prefixes
        "gateway shop/older /api",  # with a header match
        "gateway shop/older /api",
        "gateway shop/older /",
    ]
    assert vhosts[0]["routes"][3]["match"]["headers"][0]["name"] == "x-v"


def test_mesh_routes_apply_producer_routes_unless_the_caller_has_its_own() -> None:
    canary = {
        "parentRefs": [{"group": "", "kind": "Service", "name": "catalog", "port": 8080}],
        "rules": [{"backendRefs": [{"name": "catalog-v2", "port": 8080}]}],
    }
    consumer = copy.deepcopy(canary)
    consumer["parentRefs"][0]["namespace"] = "shop"
    consumer["rules"][0]["backendRefs"][0] |= {"name": "catalog-v1", "namespace": "shop"}
    state = _state(_route(canary, "canary"), _route(consumer, "mine", "web"))
    catalog = state.service("shop", "catalog")
    assert catalog is not None
    ours = mesh_routes(state, catalog, 8080, "shop")
    theirs = mesh_routes(state, catalog, 8080, "web")
    assert ours is not None and theirs is not None
    assert ours[0]["route"]["cluster"] == service_cluster_name("shop", "catalog-v2", 8080)
    assert theirs[0]["route"]["cluster"] == service_cluster_name("shop", "catalog-v1", 8080)
    dst = {"name": addresses.ORIGINAL_DST_HEADER, "string_match": {"exact": "127.96.0.21:8080"}}
    assert ours[0]["match"]["headers"] == [dst]
    assert ours[-1]["direct_response"]["status"] == 404
    tags = ours[0]["tracing"]["custom_tags"]
    assert {"tag": "hopscope.route", "literal": {"value": "HTTPRoute shop/canary"}} in tags
    assert mesh_routes(state, catalog, 9999, "shop") is None
    frontend = state.service("shop", "frontend")
    assert frontend is not None and mesh_routes(state, frontend, 8080, "shop") is None
    assert sorted(mesh_backend_services(state)) == [
        ("shop", "catalog-v1", 8080),
        ("shop", "catalog-v2", 8080),
    ]


def test_merged_hosts_keep_one_virtual_host_per_domain() -> None:
    ingress = [{"name": "shop.local", "domains": ["shop.local", "shop.local:*"], "routes": [1]}]
    gw = [
        {"name": "gateway|shop.local", "domains": ["shop.local", "shop.local:*"], "routes": [2]},
        {"name": "gateway|*", "domains": ["*"], "routes": [3]},
    ]
    merged = merge_virtual_hosts(gw, ingress)
    assert [(v["name"], v["routes"]) for v in merged] == [
        ("gateway|shop.local", [2, 1]),
        ("gateway|*", [3]),
    ]


def test_passthrough_listeners_take_tls_routes() -> None:
    gw = gateway([{"name": "tls", "port": 8443, "protocol": "TLS", "tls": {"mode": "Passthrough"}}])
    tls_route = load_document(
        {
            "apiVersion": "gateway.networking.k8s.io/v1alpha2",
            "kind": "TLSRoute",
            "metadata": {"name": "secure", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "hostnames": ["secure.shop.local"],
                "rules": [{"backendRefs": [{"name": "catalog", "port": 8080}]}],
            },
        },
        "t.yaml",
    )
    (att,) = passthrough_attachments(_state(gw, tls_route))
    assert att.hostnames == ("secure.shop.local",)
    assert att.route.rules[0].backends[0].name == "catalog"


# -- the sample manifests, rendered and validated by Envoy -------------------------------------


SAMPLES = {
    "gateway": ["gateway-shop.yaml"],
    "canary": ["gamma-catalog-v2.yaml", "gamma-canary-10-percent.yaml"],
    "mirror": ["gamma-catalog-v2.yaml", "gamma-mirror-to-v2.yaml"],
    "retries": ["gamma-retries.yaml"],
}


@pytest.fixture(scope="module")
def shop() -> list[Any]:
    return load_manifests(default_manifest_paths())


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_sample_manifests_render_configs_envoy_accepts(shop: list[Any], sample: str) -> None:
    cluster = Cluster()
    cluster.apply(shop)
    cluster.apply(load_manifests([SCENARIOS / name for name in SAMPLES[sample]]))
    state = cluster.state
    assert gateway_api.route_problems(state) == []
    gw_hosts, gw_clusters = gateway_resources(state)
    ingress_routes, ingress_clusters = ingress_resources(state)
    hosts = merge_virtual_hosts(gw_hosts, ingress_routes["virtual_hosts"])
    ingress = http_connection_manager(
        "ingress", "ingress", {"name": "ingress", "virtual_hosts": hosts}, "ingress", OTLP, {}
    )
    catalog = state.service("shop", "catalog")
    assert catalog is not None
    routes = mesh_routes(state, catalog, 8080, "shop")
    assert (routes is None) == (sample == "gateway")
    needed = [
        static_cluster(service_cluster_name(ns, name, port), svc.cluster_ip or "", port)
        for ns, name, port in mesh_backend_services(state)
        if (svc := state.service(ns, name)) is not None
    ]
    outbound = http_connection_manager(
        "outbound",
        "sidecar-outbound",
        {
            "name": "outbound",
            "virtual_hosts": [
                {
                    "name": "outbound",
                    "domains": ["*"],
                    "routes": routes
                    or [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}],
                }
            ],
        },
        "frontend",
        OTLP,
        {},
    )
    config = bootstrap(
        "127.65.9.1",
        [
            http_listener("ingress", "127.65.9.1", 18080, "INBOUND", ingress),
            http_listener("outbound", "127.65.9.1", 18081, "OUTBOUND", outbound),
        ],
        # The ingress's own clusters already hold the Gateway's (ingress_config merges them).
        list(
            {
                c["name"]: c for c in [otlp_cluster(OTLP), *ingress_clusters, *gw_clusters, *needed]
            }.values()
        ),
    )
    ok, output = validate_config(config)
    assert ok, output[-2000:]
    if sample == "gateway":
        shop_host = next(v for v in hosts if "shop.local" in v["domains"])
        first = shop_host["routes"][0]
        assert first["decorator"]["operation"] == "gateway shop/shop shop.local/api/catalog"
        assert first["route"]["regex_rewrite"]["substitution"] == "/items"


def test_every_feature_renders_a_config_envoy_accepts() -> None:
    gw = gateway(
        [
            {"name": "web", "port": 8080, "protocol": "HTTP", "hostname": "*.shop.local"},
            {"name": "any", "port": 8081, "protocol": "HTTP"},
        ]
    )
    backend = [{"name": "catalog-v1", "port": 8080}]
    http = _route(
        {
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["*.shop.local", "api.shop.local"],
            "rules": [
                {
                    "matches": [
                        {
                            "path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"},
                            "headers": [
                                {"type": "RegularExpression", "name": "x-a", "value": "b.*"}
                            ],
                            "queryParams": [
                                {"type": "RegularExpression", "name": "q", "value": "."}
                            ],
                        }
                    ],
                    "filters": [
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"}
                            },
                        },
                        {
                            "type": "RequestMirror",
                            "requestMirror": {
                                "backendRef": {"name": "catalog-v2", "port": 8080},
                                "fraction": {"numerator": 1, "denominator": 3},
                            },
                        },
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {"add": [{"name": "x-by", "value": "gw"}]},
                        },
                    ],
                    "backendRefs": backend,
                    "timeouts": {"request": "0s", "backendRequest": "1s"},
                },
                {
                    "matches": [{"path": {"value": "/old"}}],
                    "filters": [
                        {
                            "type": "RequestRedirect",
                            "requestRedirect": {
                                "hostname": "new.shop.local",
                                "port": 8443,
                                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"},
                                "statusCode": 308,
                            },
                        }
                    ],
                },
                {"matches": [{"path": {"value": "/none"}}]},
                {
                    "matches": [{"path": {"value": "/zero"}}],
                    "backendRefs": [{**backend[0], "weight": 0}],
                },
            ],
        }
    )
    grpc = load_document(
        {
            "apiVersion": GW,
            "kind": "GRPCRoute",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"name": "gw", "sectionName": "any"}],
                "rules": [
                    {
                        "matches": [
                            {"method": {"service": "shop.Reviews", "method": "List"}},
                            {"method": {"service": "shop.Reviews"}},
                            {
                                "method": {"method": "Get"},
                                "headers": [{"name": "x-v", "value": "2"}],
                            },
                            {"method": {"type": "RegularExpression", "service": "shop\\..*"}},
                        ],
                        "backendRefs": [{"name": "catalog-v2", "port": 8080}],
                    }
                ],
            },
        },
        "t.yaml",
    )
    state = _state(gw, http, grpc)
    vhosts, clusters = gateway_resources(state)
    assert [v["name"] for v in vhosts] == [
        "gateway|api.shop.local",
        "gateway|*.shop.local",
        "gateway|*",
    ]
    grpc_cluster = next(c for c in clusters if c["name"] == "gateway|shop|catalog-v2|8080")
    options = grpc_cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in json.dumps(options)
    routes = {r["decorator"]["operation"]: r for v in vhosts for r in v["routes"]}
    assert routes["gateway shop/r api.shop.local/none"]["direct_response"]["status"] == 500
    assert routes["gateway shop/r api.shop.local/zero"]["direct_response"]["status"] == 500
    assert routes["gateway shop/r api.shop.local/old"]["redirect"]["response_code"] == (
        "PERMANENT_REDIRECT"
    )
    regex = routes["gateway shop/r api.shop.local/v[0-9]+/.*"]["route"]
    # request 0s: no limit on the whole; one try only, so backendRequest limits it
    assert regex["timeout"] == "1.000s" and "retry_policy" not in regex
    (mirror,) = regex["request_mirror_policies"]
    assert mirror["runtime_fraction"]["default_value"]["numerator"] == 333_333
    assert routes["gateway shop/reviews /shop.Reviews/List"]["match"] == {
        "path": "/shop.Reviews/List",
        "grpc": {},
    }
    hcm = http_connection_manager(
        "ingress", "ingress", {"name": "ingress", "virtual_hosts": vhosts}, "ingress", OTLP, {}
    )
    config = bootstrap(
        "127.65.9.2",
        [http_listener("ingress", "127.65.9.2", 18080, "INBOUND", hcm)],
        [otlp_cluster(OTLP), *clusters],
    )
    ok, output = validate_config(config)
    assert ok, output[-2000:]


def test_mesh_routes_fit_in_front_of_a_rendered_sidecars_outbound_routes(
    shop: list[Any],
) -> None:
    """The way the sidecar takes them: first in its outbound virtual host, with a cluster
    per backend Service port."""
    cluster = Cluster()
    cluster.apply(shop)
    cluster.apply(load_manifests([SCENARIOS / n for n in SAMPLES["canary"]]))
    state = cluster.state
    pod = next(p for p in state.pods if p.labels.get("app") == "frontend")
    config = render_sidecar(pod, state, OTLP)
    outbound = next(
        lst for lst in config["static_resources"]["listeners"] if lst["name"] == "outbound"
    )
    hcm = outbound["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    gamma = mesh_outbound_routes(
        state, pod.namespace, lambda svc, port: {"k8s.service.name": svc.name}
    )
    service_tag = {"tag": "k8s.service.name", "literal": {"value": "catalog"}}
    assert all(service_tag in r["tracing"]["custom_tags"] for r in gamma)
    assert [r.get("route", {}).get("weighted_clusters") is not None for r in gamma] == [
        True,
        False,  # the 404 for requests to catalog no rule matches
    ]
    vhost["routes"] = gamma + vhost["routes"]
    have = {c["name"] for c in config["static_resources"]["clusters"]}
    config["static_resources"]["clusters"] += [
        static_cluster(name, svc.cluster_ip or "", port)
        for ns, svc_name, port in mesh_backend_services(state)
        if (name := service_cluster_name(ns, svc_name, port)) not in have
        and (svc := state.service(ns, svc_name)) is not None
    ]
    ok, output = validate_config(config)
    assert ok, output[-2000:]


def test_a_tls_route_on_a_passthrough_listener_is_served_by_sni_on_the_ingress() -> None:
    from mesh.envoy.ingress import ingress_config, render_ingress

    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    listener = {
        "name": "tls",
        "protocol": "TLS",
        "port": 8443,
        "tls": {"mode": "Passthrough"},
        "allowedRoutes": {"kinds": [{"kind": "TLSRoute"}]},
    }
    tls_route = load_document(
        {
            "apiVersion": "gateway.networking.k8s.io/v1alpha2",
            "kind": "TLSRoute",
            "metadata": {"name": "vault", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"name": "gw", "sectionName": "tls"}],
                "hostnames": ["vault.shop.local"],
                "rules": [{"backendRefs": [{"name": "catalog", "port": 8080}]}],
            },
        },
        "test.yaml",
    )
    cluster.apply([gateway([listener]), tls_route])
    resources = ingress_config(cluster.state)
    (chain,) = [c for c in resources.tls.passthrough if c.host == "vault.shop.local"]
    assert chain.ingress == "TLSRoute shop/vault" and chain.backend.service == "catalog"
    assert "ingress-passthrough|shop|catalog|8080" in {c["name"] for c in resources.clusters}
    config = render_ingress(cluster.state, OTLP)
    https = next(
        li for li in config["static_resources"]["listeners"] if li["name"] != "ingress_http"
    )
    names = [c.get("filter_chain_match", {}).get("server_names") for c in https["filter_chains"]]
    assert ["vault.shop.local"] in names, names
    ok, output = validate_config(config)
    assert ok, output[-2000:]


def test_an_https_listener_terminates_with_its_certificate_ref_on_the_ingress() -> None:
    from mesh.envoy.ingress import ingress_config, render_ingress
    from mesh.identity.ca import CertificateAuthority
    from mesh.model.k8s_objects import tls_secret_document

    cert, key = CertificateAuthority.create().issue_server_certificate(["gw.shop.local"])
    secret = load_document(tls_secret_document("shop", "gw-tls", cert, key), "test.yaml")
    listener = {
        "name": "https",
        "protocol": "HTTPS",
        "port": 8443,
        "hostname": "gw.shop.local",
        "tls": {"mode": "Terminate", "certificateRefs": [{"name": "gw-tls"}]},
    }
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    https_route = route(
        {
            "parentRefs": [{"name": "gw", "sectionName": "https"}],
            "rules": [{"backendRefs": [{"name": "frontend", "port": 8080}]}],
        }
    )
    cluster.apply([secret, gateway([listener]), load_document(https_route, "test.yaml")])
    resources = ingress_config(cluster.state)
    (chain,) = resources.tls.terminating
    assert chain.secret == "shop/gw-tls" and chain.hosts == ["gw.shop.local"], chain
    hosts = [vh["domains"] for vh in resources.https_routes["virtual_hosts"]]
    assert any("gw.shop.local" in d for d in hosts), hosts
    assert not resources.warnings, resources.warnings
    ok, output = validate_config(render_ingress(cluster.state, OTLP))
    assert ok, output[-2000:]
