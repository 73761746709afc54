"""The demo shop: what ``meshctl up --demo`` applies.

The namespace carries no ambient label on purpose: the user adds it
(``meshctl label namespace shop istio.io/dataplane-mode=ambient``) and watches traffic move into
the mesh without restarting anything. Each service has its own service account, so each gets its
own SPIFFE identity once captured.
"""

from __future__ import annotations

NAMESPACE = "shop"
SERVICES = ("product-catalog", "order-management", "payment-processing")
CLIENT = "client"
PODS = (*SERVICES, CLIENT)


def _pod(name: str, extra_args: str = "") -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    app: {name}
spec:
  serviceAccountName: {name}
  containers:
    - name: app
      command: ["mesh-demo-app", "serve", "--service", "{name}", "--port", "8080"{extra_args}]
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
        _pod("product-catalog"),
        _pod("payment-processing"),
        _pod("order-management", order_upstreams),
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
