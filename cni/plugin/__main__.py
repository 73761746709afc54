"""`python -m cni.plugin`: the same as the `mesh-cni` console script."""

from __future__ import annotations

from cni.plugin.main import main

main()
