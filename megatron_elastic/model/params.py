"""Rules about parameters by name, shared by the optimizer and the checkpoint formats."""

# Parameters without weight decay (norm scales, biases, the SSM's A_log / D / dt_bias). The optimizer builds its
# param groups with it, and the dist checkpoint format rebuilds the same groups to place optimizer state.
NO_DECAY = ("norm.weight", ".bias", "A_log", ".D", "dt_bias")
