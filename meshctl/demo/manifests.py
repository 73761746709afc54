"""The demo shop: what ``meshctl up --demo`` applies.

The namespace carries no ambient label on purpose: the user adds it
(``meshctl label namespace shop istio.io/dataplane-mode=ambient``) and watches traffic move into
the mesh without restarting anything. Each service is a Deployment with its own service account,
so each gets its own SPIFFE identity once captured; product-catalog runs two replicas, so its
service has two endpoints to balance across. Deployment pods have generated names
(``product-catalog-<hash>-<suffix>``); the client is a bare Pod named `CLIENT`.
"""

from __future__ import annotations

NAMESPACE = "shop"
SERVICES = ("product-catalog", "order-management", "payment-processing")
DEPLOYMENTS = SERVICES  # one Deployment per service, named like it
REPLICAS = {"product-catalog": 2, "order-management": 1, "payment-processing": 1}
CLIENT = "client"


def _deployment(name: str, extra_args: str = "") -> str:
    return f"""---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    app: {name}
spec:
  replicas: {REPLICAS[name]}
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
      annotations:
        # In the mesh, ztunnel hands each connection to port 15088 behind a PROXY v2 header
        # that names the caller's SPIFFE identity, so the app can show it.
        ambient.istio.io/application-tunnel: PROXY/15088
    spec:
      serviceAccountName: {name}
      containers:
        - name: app
          command: ["mesh-demo-app", "serve", "--service", "{name}", "--port", "8080",
                    "--proxy-port", "15088"{extra_args}]
          lifecycle:
            # Time for every node's ztunnel to stop choosing this pod before it stops.
            preStop:
              sleep:
                seconds: 2
          ports:
            - name: http
              containerPort: 8080
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
"""


def _service(name: str) -> str:
    return f"""---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    app: {name}
spec:
  selector:
    app: {name}
  ports:
    - name: http
      port: 80
      targetPort: http
"""


def build_demo_manifest() -> str:
    order_upstreams = (
        ', "--upstream", "catalog=http://product-catalog.shop/products"'
        ', "--upstream", "payment=http://payment-processing.shop/pay"'
    )
    parts = [
        f"""apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
""",
        _deployment("product-catalog"),
        _deployment("payment-processing"),
        _deployment("order-management", order_upstreams),
        *(_service(name) for name in SERVICES),
        f"""---
apiVersion: v1
kind: Pod
metadata:
  name: {CLIENT}
  namespace: {NAMESPACE}
  labels:
    app: {CLIENT}
spec:
  serviceAccountName: {CLIENT}
  containers:
    - name: client
      command: ["sleep", "infinity"]
""",
    ]
    return "".join(parts)
