"""Workload identity: SPIFFE IDs, the certificate authority, CSRs and certificate checks."""
