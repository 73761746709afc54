"""asyncio helpers shared by the components: start-up tuning, task groups, draining."""
