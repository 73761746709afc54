"""meshctl and Istio's security kinds: the names `get`/`delete` accept, the table columns, and
YAML manifests whose keys are numbers (a PeerAuthentication's portLevelMtls)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from meshcore.kube import objects
from meshctl import errors, kinds, manifest, tables

NOW = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("name", "rtype"),
    [
        ("authorizationpolicies", kinds.AUTHORIZATION_POLICIES),
        ("authorizationpolicy", kinds.AUTHORIZATION_POLICIES),
        ("ap", kinds.AUTHORIZATION_POLICIES),
        ("AP", kinds.AUTHORIZATION_POLICIES),
        ("authorizationpolicies.security.istio.io", kinds.AUTHORIZATION_POLICIES),
        ("peerauthentications", kinds.PEER_AUTHENTICATIONS),
        ("peerauthentication", kinds.PEER_AUTHENTICATIONS),
        ("pa", kinds.PEER_AUTHENTICATIONS),
        ("peerauthentication.security.istio.io", kinds.PEER_AUTHENTICATIONS),
        ("deployments.apps", kinds.DEPLOYMENTS),
    ],
)
def test_resource_names(name: str, rtype: Any) -> None:
    assert kinds.find_resource(name) == rtype


def test_unknown_names_list_the_policy_kinds() -> None:
    with pytest.raises(errors.UsageError) as caught:
        kinds.find_resource("policies")
    message = str(caught.value)
    assert "authorizationpolicies (ap)" in message
    assert "peerauthentications (pa)" in message


def _obj(kind: str, name: str, spec: dict[str, Any], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2025-01-01T11:58:00Z"},
        "spec": spec,
    }


def test_authorization_policy_table() -> None:
    items = [
        _obj("AuthorizationPolicy", "deny-ssh", {"action": "DENY", "rules": [{}]}),
        _obj("AuthorizationPolicy", "allow-nothing", {}),
    ]
    headers, rows = tables.build_rows(kinds.AUTHORIZATION_POLICIES, items, now=NOW)
    assert headers == ["NAME", "ACTION", "AGE"]
    assert rows == [["deny-ssh", "DENY", "2m"], ["allow-nothing", "ALLOW", "2m"]]


def test_peer_authentication_table_across_namespaces() -> None:
    items = [
        _obj("PeerAuthentication", "default", {"mtls": {"mode": "STRICT"}}, ns="istio-system"),
        _obj("PeerAuthentication", "inherit", {}),
    ]
    headers, rows = tables.build_rows(
        kinds.PEER_AUTHENTICATIONS, items, now=NOW, all_namespaces=True
    )
    assert headers == ["NAMESPACE", "NAME", "MODE", "AGE"]
    assert rows == [
        ["istio-system", "default", "STRICT", "2m"],
        ["shop", "inherit", "UNSET", "2m"],
    ]


PA_YAML = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: db
  namespace: shop
  annotations:
    note: 2024-01-01
spec:
  selector:
    matchLabels:
      app: db
  portLevelMtls:
    5432:
      mode: STRICT
"""


def test_numeric_yaml_keys_and_dates_become_json_strings() -> None:
    (doc,) = manifest.parse_documents(PA_YAML, "pa.yaml")
    assert doc.obj["spec"]["portLevelMtls"] == {"5432": {"mode": "STRICT"}}
    assert doc.obj["metadata"]["annotations"] == {"note": "2024-01-01"}


def test_reapplying_a_numeric_key_manifest_changes_nothing() -> None:
    """The three-way apply compares the manifest with what the server stored (string keys):
    with the YAML's integer keys it would delete and re-add the port on every apply."""
    (doc,) = manifest.parse_documents(PA_YAML, "pa.yaml")
    desired = objects.merge_patch(
        doc.obj,
        {"metadata": {"annotations": {objects.LAST_APPLIED: objects.build_last_applied(doc.obj)}}},
    )
    live = json.loads(json.dumps(desired))  # as the server stores it: JSON
    live["metadata"].update(uid="u", resourceVersion="7")
    assert objects.build_apply_patch(objects.find_last_applied(live), desired, live) == {}
