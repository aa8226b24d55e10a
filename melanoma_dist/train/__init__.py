"""Training of one fold."""
