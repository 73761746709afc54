"""inpod."""
