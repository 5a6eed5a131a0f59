"""Training: the loop, LR schedule, checkpoints with exact resume, signal handling, data setup."""
