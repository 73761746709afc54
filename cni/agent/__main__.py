from __future__ import annotations

from cni.agent.app import main

if __name__ == "__main__":
    main()
