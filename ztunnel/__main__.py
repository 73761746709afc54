from __future__ import annotations

from ztunnel.app import main

main()
