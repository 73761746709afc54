"""The waypoint: ambient mesh's per-namespace L7 proxy (HTTP routing, resilience, authorization,
telemetry). So far its HTTP/1.1 engine, driven by `meshcore.traffic` route tables."""
