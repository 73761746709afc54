"""redirect."""
