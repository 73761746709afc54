from __future__ import annotations

from waypoint import app

app.main()
