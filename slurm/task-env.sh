# Sourced by the batch scripts in slurm/ once REPO is set: what every srun task of the job gets.
# - CPUs: srun does not inherit sbatch's --cpus-per-task (Slurm 22.05+), so it is passed on through
#   SRUN_CPUS_PER_TASK; OMP_NUM_THREADS follows the CPUs a task has, not the submitting shell's value.
# - Container: with MEGATRON_ELASTIC_CONTAINER_IMAGE set (slurm/profiles/h100-pyxis.env) every task
#   runs in that pyxis image, with the checkout, the submit directory (where relative paths of the
#   command line point) and MEGATRON_ELASTIC_CONTAINER_MOUNTS mounted at their own paths.
# - MEGATRON_ELASTIC_SRUN_ARGS: any other srun arguments, appended.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
SRUN_ARGS=()
if [ -n "${MEGATRON_ELASTIC_CONTAINER_IMAGE:-}" ]; then
  _mounts="$REPO:$REPO,$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR${MEGATRON_ELASTIC_CONTAINER_MOUNTS:+,$MEGATRON_ELASTIC_CONTAINER_MOUNTS}"
  SRUN_ARGS=(--container-image="$MEGATRON_ELASTIC_CONTAINER_IMAGE" --container-mounts="$_mounts"
             --container-workdir="$SLURM_SUBMIT_DIR" --no-container-mount-home)
fi
# shellcheck disable=SC2206  # several words on purpose
SRUN_ARGS+=(${MEGATRON_ELASTIC_SRUN_ARGS:-})
