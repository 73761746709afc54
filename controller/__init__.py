"""The controller: watches the cluster (or the local store), translates it into workloads,
services and authorizations, pushes them over delta xDS, and signs workload certificates."""
