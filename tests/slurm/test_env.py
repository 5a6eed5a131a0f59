"""Pieces of the Slurm launcher that need no cluster: the env:// variables derived from a task's
SLURM_* variables, the master port, Slurm time strings, gres strings, cluster profiles."""

import os
import shlex
import subprocess
import types

import pytest

from megatron_elastic.errors import UserError
from megatron_elastic.slurm import profiles
from megatron_elastic.slurm.cluster import gpus_in_gres
from megatron_elastic.slurm.env import master_port, node_address, torch_env_from_slurm
from megatron_elastic.slurm.submit import REPO_ROOT, LaunchRequest, batch_script, container_mounts, error_line, parse_time

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
    assert (ci.mem, ci.exclusive, ci.container_image) == ("0", True, None)
    pyxis = profiles.load_profile("h100-pyxis")
    assert pyxis.gpus_per_node == 8 and pyxis.python == "python" and pyxis.cpus_per_task == 16
    assert pyxis.container_image == "nvcr.io#nvidia/pytorch:25.01-py3" and pyxis.srun_args == []
    assert not any("PWD" in v or "/shared/me" in v for v in pyxis.env.values())  # nothing mounts the submit dir
    assert pyxis.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and "MEGATRON_ELASTIC_CONTAINER_IMAGE" not in pyxis.env


def test_bad_profiles_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        profiles.load_profile("no-such-cluster")
    bad = tmp_path / "bad.env"
    bad.write_text("export SBATCH_PARTITION=gpu\nmodule load cuda\n")
    with pytest.raises(UserError, match="line 2"):
        profiles.load_profile(str(bad))
    bad.write_text("export SBATCH_MEM_PER_NODE=lots\n")
    with pytest.raises(UserError, match="SBATCH_MEM_PER_NODE='lots' .* is not a Slurm size"):
        profiles.load_profile(str(bad))
    bad.write_text("export MEGATRON_ELASTIC_EXCLUSIVE=yes\n")
    with pytest.raises(UserError, match="must be 0 or 1"):
        profiles.load_profile(str(bad))


def test_batch_script_requeues_on_exit_75(tmp_path):
    req = LaunchRequest(config="/r/tiny.yaml", overrides=["train.max_steps=5"], run_dir=tmp_path, nodes=2,
                        gpus_per_node=8, tasks_per_node=8, cpus_per_task=16, time_min=240, partition="batch",
                        srun_args=["--container-image=img"], env={"NCCL_DEBUG": "WARN"})  # fmt: skip
    script = batch_script(req)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --time=240", "#SBATCH --partition=batch",
                 "#SBATCH --open-mode=append", "export NCCL_DEBUG=WARN", "#SBATCH --exclusive", "#SBATCH --mem=0",
                 "#SBATCH --cpus-per-task=16", "export SRUN_CPUS_PER_TASK=16", "export OMP_NUM_THREADS=16",
                 'scontrol requeue "$SLURM_JOB_ID"'):  # fmt: skip
        assert line in [ln.strip() for ln in script.splitlines()], line
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


def test_generated_script_mounts_checkout_run_dir_and_inputs(tmp_path):
    """A pyxis job sees the checkout, the run directory and every input of the recipe, each once, at its own path."""
    from megatron_elastic.config import load_config

    data, parent = tmp_path / "data", tmp_path / "models" / "parent"
    cfg = load_config("tiny", [f"data.train_prefix={data}/c_train", f"data.valid_prefix={data}/c_valid",
                               f"data.tokenizer={data}/tok/tokenizer.json"])  # fmt: skip
    run_dir = tmp_path / "runs" / "r"
    mounts = container_mounts(cfg, run_dir, ["/lustre/scratch"])
    assert mounts == [f"{REPO_ROOT}:{REPO_ROOT}", f"{run_dir}:{run_dir}", f"{data}:{data}", "/lustre/scratch"]
    cfg.elastic = types.SimpleNamespace(parent=str(parent), ranking=str(parent / "ranking.json"))
    assert container_mounts(cfg, run_dir, [])[-1] == f"{parent}:{parent}"  # the ranking inside it adds nothing
    req = LaunchRequest(config="/r/tiny.yaml", overrides=[], run_dir=run_dir, nodes=8, gpus_per_node=8,
                        tasks_per_node=8, cpus_per_task=16, time_min=240, container_image="nvcr.io#nvidia/pytorch:x",
                        container_mounts=mounts, srun_args=["--mpi=pmix"], mem="500G", exclusive=False)  # fmt: skip
    script = batch_script(req)
    srun = shlex.join(shlex.split(next(ln for ln in script.splitlines() if ln.startswith("srun "))))
    assert shlex.join(["--container-image=nvcr.io#nvidia/pytorch:x", f"--container-mounts={','.join(mounts)}",
                       f"--container-workdir={REPO_ROOT}", "--no-container-mount-home", "--mpi=pmix"]) in srun
    assert "#SBATCH --mem=500G" in script and "--exclusive" not in script


def test_sbatch_templates_give_tasks_cpus_threads_and_container(tmp_path):
    """The templates ask for whole nodes and source slurm/task-env.sh; run here, it sets what srun passes on."""
    for name in ("train", "importance", "extract-eval"):
        text = (REPO_ROOT / "slurm" / f"{name}.sbatch").read_text()
        assert 'source "$REPO/slurm/task-env.sh"' in text and 'srun "${SRUN_ARGS[@]}" ' in text, name
        assert "MEGATRON_ELASTIC_SRUN_ARGS:-} " not in text and "OMP_NUM_THREADS=${OMP" not in text, name
    train = (REPO_ROOT / "slurm" / "train.sbatch").read_text().splitlines()
    assert "#SBATCH --exclusive" in train and "#SBATCH --mem=0" in train
    show = 'source slurm/task-env.sh; echo "$SRUN_CPUS_PER_TASK|$OMP_NUM_THREADS"; for a in "${SRUN_ARGS[@]}"; do echo "$a"; done'
    base = {"PATH": os.environ["PATH"], "REPO": "/co", "SLURM_SUBMIT_DIR": "/home/u/sub", "OMP_NUM_THREADS": "64"}
    plain = subprocess.run(["bash", "-c", show], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                           env={**base, "SLURM_CPUS_PER_TASK": "16"}).stdout.splitlines()  # fmt: skip
    assert plain == ["16|16"]
    boxed = subprocess.run(["bash", "-c", show], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                           env={**base, "MEGATRON_ELASTIC_CONTAINER_IMAGE": "img", "MEGATRON_ELASTIC_SRUN_ARGS": "-l -v",
                                "MEGATRON_ELASTIC_CONTAINER_MOUNTS": "/data:/data"}).stdout.splitlines()  # fmt: skip
    assert boxed == ["|1", "--container-image=img", "--container-mounts=/co:/co,/home/u/sub:/home/u/sub,/data:/data",
                     "--container-workdir=/home/u/sub", "--no-container-mount-home", "-l", "-v"]
