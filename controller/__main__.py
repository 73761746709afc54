from __future__ import annotations

from controller.app import main

main()
