"""The node agent and the chained CNI plugin: decide which pods are captured, program the in-pod
redirection, and hand each pod's network namespace to ztunnel over ZDS."""
