"""Running on Slurm: the torch distributed environment from Slurm's variables, sbatch templates and
submission through submitit."""
