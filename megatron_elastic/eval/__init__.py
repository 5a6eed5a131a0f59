"""Evaluation per budget and the study that compares the method with its alternatives.

- :mod:`.mqar`      multi-query associative recall: generator, accuracy, text/MQAR mixed loader
- :mod:`.shift`     the shifted domain (the machine's license texts)
- :mod:`.metrics`   loss and bits per byte, inference memory, CPU latency
- :mod:`.harness`   one evaluation of many models on the same data (``megatron-elastic eval``); :mod:`.tasks` their names
- :mod:`.baselines` one-shot, separate distillation, depth-only, from scratch
- :mod:`.study`     ``megatron-elastic study``: every stage, seeded; :mod:`.report` writes the results
"""
