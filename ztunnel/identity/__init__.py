"""ztunnel's workload certificates: the CA client and the manager that fetches, caches and
renews one certificate per local identity."""
