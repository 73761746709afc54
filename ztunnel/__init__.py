"""ztunnel: the per-node L4 proxy. Listens inside every enrolled pod's network namespace and
carries its TCP connections through HBONE (HTTP/2 CONNECT over mutual TLS 1.3)."""
