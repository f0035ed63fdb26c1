"""tensorline."""
