"""Small runnable examples (need the ``examples`` extra)."""
