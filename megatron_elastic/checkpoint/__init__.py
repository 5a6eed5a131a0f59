"""Checkpoint formats: the single-process native format (:mod:`.native`) and megatron-core
dist_checkpointing (:mod:`.dist`); both share ``latest``, the small files and the RNG state."""
