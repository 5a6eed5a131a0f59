"""The evaluation tasks by name, light to import (the command line lists them in its help without loading torch)."""

TASKS = ("loss", "recall", "shift", "sample")
"""loss and bits per byte; associative recall (MQAR); the shifted domain; a greedy sample."""
