"""megatron-core glue: process groups (:mod:`.groups`), pipeline stages and the 1F1B schedule
(:mod:`.pipeline`), data-parallel gradient averaging (:mod:`.data`) and the trainers that combine them (:mod:`.trainer`;
their layout-independent checkpoints are :mod:`megatron_elastic.checkpoint.dist`). Tensor parallelism lives
in :mod:`.tensor` and :mod:`.losses`.

Importing this package does not import megatron-core (about 7 s); the submodules do, when used.
"""

from megatron_elastic.utils.lazy import lazy_exports

__all__ = ["ParallelGroups", "build_groups", "destroy_parallel", "init_parallel", "single_process"]

# On first use, so that importing a light submodule (the `plan` command's registration) does not import torch.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {name: ".groups" for name in __all__})
