"""Istio's ServiceEntry through `meshctl apply` and `meshctl get` and the real local API server:
a bad one is refused naming the field, a good one in any served version applies with warnings for
what is not acted on, and `get se` prints Istio's columns."""

from __future__ import annotations

import itertools

import yaml

from controller.sources.local import kinds
from tests.direct import meshctl_harness

playground = meshctl_harness.playground

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
EXTERNAL = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-api
  namespace: shop
spec:
  hosts: [api.example.com, www.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports:
  - {number: 443, name: https, protocol: TLS}
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: vms
  namespace: shop
spec:
  hosts: [mongo.vms.internal]
  ports:
  - {number: 27017, name: mongo, protocol: mongo}
  resolution: STATIC
  endpoints:
  - address: 10.20.0.5
"""


def test_service_entries_apply_and_list_with_istios_columns(
    playground: meshctl_harness.Playground,
) -> None:
    playground.meshctl("apply", "-f", "-", stdin=NAMESPACE)
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=EXTERNAL)
    assert code == 0, err
    assert out.splitlines() == [
        "serviceentry.networking.istio.io/external-api created",
        "serviceentry.networking.istio.io/vms created",
    ]
    assert err == "Warning: spec.exportTo: accepted, not acted on by this mesh\n"
    stored = playground.store.find(kinds.SERVICE_ENTRIES, "vms", "shop")
    assert stored is not None
    assert stored["apiVersion"] == "networking.istio.io/v1"  # stored in the preferred version

    for name in ("serviceentries", "se", "serviceentry.networking.istio.io"):
        code, out, err = playground.meshctl("get", name, "-n", "shop")
        assert code == 0, err
        header, *lines = out.splitlines()
        assert header.split() == ["NAME", "HOSTS", "LOCATION", "RESOLUTION", "AGE"]
        starts = [header.index(h) for h in ("NAME", "HOSTS", "LOCATION", "RESOLUTION", "AGE")]
        cells = [[line[a:b].strip() for a, b in itertools.pairwise(starts)] for line in lines]
        assert cells == [
            ["external-api", '["api.example.com","www.example.com"]', "MESH_EXTERNAL", "DNS"],
            ["vms", '["mongo.vms.internal"]', "", "STATIC"],  # no location given: blank
        ]

    code, out, err = playground.meshctl("get", "se", "vms", "-n", "shop", "-o", "yaml")
    assert code == 0, err
    assert yaml.safe_load(out)["spec"]["endpoints"] == [{"address": "10.20.0.5"}]


def test_a_bad_service_entry_is_refused_naming_the_field(
    playground: meshctl_harness.Playground,
) -> None:
    playground.meshctl("apply", "-f", "-", stdin=NAMESPACE)
    static_hostname = EXTERNAL.split("---")[1].replace("10.20.0.5", "mongo-1.vms.internal")
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=static_hostname)
    assert (code, out) == (1, "")
    assert (
        'spec.endpoints[0].address: Invalid value: "mongo-1.vms.internal": resolution STATIC '
        "needs an IP address"
    ) in err
    assert playground.store.find(kinds.SERVICE_ENTRIES, "vms", "shop") is None
