"""Pieces of the Slurm launcher that need no cluster: the env:// variables derived from a task's
SLURM_* variables, the master port, Slurm time strings, gres strings, cluster profiles."""

import os

import pytest

from megatron_elastic.errors import UserError
from megatron_elastic.slurm import profiles
from megatron_elastic.slurm.cluster import gpus_in_gres
from megatron_elastic.slurm.env import master_port, node_address, torch_env_from_slurm
from megatron_elastic.slurm.submit import LaunchRequest, batch_script, error_line, parse_time

TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "node7"}  # fmt: skip


def test_task_environment_becomes_torch_env():
    env = dict(TASK)
    values = torch_env_from_slurm(env)
    assert values == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": str(20000 + 4242),
                      "MASTER_ADDR": "node7"}  # fmt: skip
    assert {k: env[k] for k in values} == values


def test_master_port_is_a_function_of_the_job_id():
    assert master_port(4242) == master_port("4242") == 24242
    assert master_port(123456) == 20000 + 123456 % 20000 == 23456
    assert master_port("77_3") == master_port(77)  # an array task id spelled with its index
    ports = {master_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 40000 for p in ports)


def test_batch_shell_and_torchrun_are_left_alone():
    batch = {k: v for k, v in TASK.items() if k != "SLURM_STEP_ID"}  # the batch script itself is no rank
    assert torch_env_from_slurm(batch) == {} and "RANK" not in batch
    torchrun = {**TASK, "RANK": "0", "WORLD_SIZE": "8"}
    assert torch_env_from_slurm(torchrun) == {} and torchrun["WORLD_SIZE"] == "8"
    assert torch_env_from_slurm({"PATH": os.environ.get("PATH", "")}) == {}


def test_resolvable_node_name_is_used_as_is():
    assert node_address("localhost") == "localhost"


@pytest.mark.parametrize("text,minutes", [("30", 30), ("1:30", 2), ("4:00:00", 240), ("1-00:00:00", 1440),
                                          ("2-3", 2 * 1440 + 180), ("0:0:59", 1)])  # fmt: skip
def test_slurm_time_strings(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:xx", "0"])
def test_bad_time_strings_are_user_errors(text):
    with pytest.raises(UserError, match="--time"):
        parse_time(text)


@pytest.mark.parametrize("gres,gpus", [("gpu:8", 8), ("gpu:h100:8(S:0-1)", 8), ("gpu:a:2,gpu:b:2,nic:1", 4),
                                       ("(null)", 0), ("nic:2", 0)])  # fmt: skip
def test_gpus_in_gres(gres, gpus):
    assert gpus_in_gres(gres) == gpus


def test_shipped_profiles_load(monkeypatch):
    monkeypatch.setenv("PWD", "/shared/me/megatron-elastic")
    assert {"ci", "h100", "h100-pyxis"} <= set(profiles.available())
    ci = profiles.load_profile("ci")
    assert (ci.partition, ci.gpus_per_node, ci.cpus_per_task) == ("debug", 2, 1)
    assert ci.env == {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pyxis = profiles.load_profile("h100-pyxis")
    assert pyxis.gpus_per_node == 8 and pyxis.python == "python"
    assert "--container-mounts=/shared/me/megatron-elastic:/shared/me/megatron-elastic" in pyxis.srun_args
    assert pyxis.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and "MEGATRON_ELASTIC_SRUN_ARGS" not in pyxis.env


def test_bad_profiles_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        profiles.load_profile("no-such-cluster")
    bad = tmp_path / "bad.env"
    bad.write_text("export SBATCH_PARTITION=gpu\nmodule load cuda\n")
    with pytest.raises(UserError, match="line 2"):
        profiles.load_profile(str(bad))


def test_batch_script_requeues_on_exit_75(tmp_path):
    req = LaunchRequest(config="/r/tiny.yaml", overrides=["train.max_steps=5"], run_dir=tmp_path, nodes=2,
                        gpus_per_node=8, tasks_per_node=8, cpus_per_task=16, time_min=240, partition="batch",
                        srun_args=["--container-image=img"], env={"NCCL_DEBUG": "WARN"})  # fmt: skip
    script = batch_script(req)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --time=240", "#SBATCH --partition=batch",
                 "#SBATCH --open-mode=append", "export NCCL_DEBUG=WARN",
                 'scontrol requeue "$SLURM_JOB_ID"'):  # fmt: skip
        assert line in script, line
    assert "--container-image=img" in script and "launch/train.py --config /r/tiny.yaml train.max_steps=5" in script
    # the requeue test reads srun's exit status: nothing but comments may stand between them
    lines = script.splitlines()
    srun = next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    rc = next(i for i, ln in enumerate(lines) if ln.startswith("rc=$?"))
    assert all(not ln.strip() or ln.startswith("#") for ln in lines[srun + 1 : rc])


def test_error_line_prefers_the_one_line_error():
    tail = ["[train] starting", "Traceback (most recent call last):", "ValueError: boom",
            "launch/train.py: error: train.device=cuda but no CUDA device is available; use cpu"]  # fmt: skip
    assert error_line(tail).startswith("launch/train.py: error: train.device=cuda")
    traceback = ["x", "Traceback (most recent call last):", "  File 'a'", "RuntimeError: bad"]
    assert error_line(traceback) == "RuntimeError: bad"
