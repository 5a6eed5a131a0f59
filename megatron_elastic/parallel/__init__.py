"""megatron-core glue: process groups (:mod:`.groups`), pipeline stages and the 1F1B schedule
(:mod:`.pipeline`), data-parallel gradient averaging (:mod:`.data`) and the trainers that combine them (:mod:`.trainer`;
their layout-independent checkpoints are :mod:`megatron_elastic.checkpoint.dist`). Tensor parallelism lives
in :mod:`.tensor` and :mod:`.losses`.

Importing this package does not import megatron-core (about 7 s); the submodules do, when used.
"""

from megatron_elastic.parallel.groups import (
    ParallelGroups,
    build_groups,
    destroy_parallel,
    init_parallel,
    single_process,
)

__all__ = ["ParallelGroups", "build_groups", "destroy_parallel", "init_parallel", "single_process"]
