"""The mesh's view of the world as frozen values: workloads, services, authorizations.

A change is a new object. Nothing here does I/O.
"""
