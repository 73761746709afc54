"""``python -m meshctl``: the same as the ``meshctl`` console script."""

from __future__ import annotations

import sys

from meshctl import cli

sys.exit(cli.main())
