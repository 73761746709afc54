"""A small Kubernetes API client (list, watch, get, create, patch, delete) and an informer."""
