"""`megatron-elastic plan`: the paper's 12B recipe fits on 8 x 8 H100 in both curriculum stages; a recipe
that does not fit exits 2 with the fix as its last stderr line; the numbers follow from the memory model
(tests/unit/test_memory_model.py checks that against measurement) and from the recipe's batch;
`launch slurm` refuses a job that does not fit, or a stop signal too short to save, before submitting."""

import argparse
import json

import pytest

from megatron_elastic.cli import main
from megatron_elastic.config import load_config
from megatron_elastic.errors import UserError
from megatron_elastic.parallel.memory import GB
from megatron_elastic.parallel.plan import make_plan, parse_size
from megatron_elastic.tracking.perf import forward_flops_per_token

RECIPE = "configs/nemotron-nano-12b-v2-elastic.yaml"
JOB = ["--nodes", "8", "--gpus-per-node", "8"]


def test_the_12b_recipe_fits_both_stages_on_8x8_h100(capsys):
    assert main(["plan", "--config", RECIPE, *JOB]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (8,192 tokens)" in out and "stage 2 (49,152 tokens)" in out and "ok: fits" in out
    plan = make_plan(load_config(RECIPE), nodes=8, gpus_per_node=8)
    assert (plan.tp, plan.dp, plan.parameters) == (8, 8, 12_310_001_152)
    s1, s2 = plan.stages
    for stage in plan.stages:  # at least 10% margin on an 80 GB GPU
        assert stage.fits and stage.memory.total <= 72 * GB
        assert stage.layout.recompute == "full" and stage.layout.sequence_parallel and stage.layout.distributed_optimizer
    assert s2.memory.total > s1.memory.total  # six times the tokens per sample
    # tokens and FLOPs per step: 768 samples; the teacher's forward plus one masked student's forward and backward
    assert s1.tokens_per_step == 768 * 8192 and s2.tokens_per_step == 768 * 49152
    model = load_config(RECIPE).model
    assert s1.flops_per_step == pytest.approx(768 * 8192 * 4 * forward_flops_per_token(model, 8192))
    assert s1.step_s == pytest.approx(s1.flops_per_step / (64 * 989e12 * 0.35))
    # checkpoint: bf16 weights + fp32 main weights + 2 fp32 moments = 14 bytes per parameter
    assert plan.checkpoint_bytes == 14 * 12_310_001_152
    assert plan.signal_s >= 2 * plan.save_s + s2.step_s and plan.signal_s % 10 == 0


def test_a_recipe_that_does_not_fit_names_the_fix(capsys):
    code = main(["plan", "--config", RECIPE, *JOB, "train.recompute=selective", "parallel.sequence_parallel=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2  # the verdict names the first stage that does not fit, on the last line
    assert err[-1] == ("megatron-elastic: error: stage 1 (8,192 tokens) needs 81.2 GB per GPU of 72.0 (80 GB - 10%); "
                       "set parallel.sequence_parallel=true"), err[-1]
    plan = make_plan(load_config(RECIPE, ["train.recompute=selective", "parallel.sequence_parallel=false"]), nodes=8,
                     gpus_per_node=8)  # fmt: skip
    assert plan.stages[1].fix == "parallel.sequence_parallel=true train.recompute=full"  # no one change is enough
    plan = make_plan(load_config(RECIPE, ["train.recompute=selective"]), nodes=8, gpus_per_node=8)
    assert plan.stages[0].fits and not plan.stages[1].fits and plan.stages[1].fix == "train.recompute=full"


def test_json_output_and_a_bigger_gpu(capsys):
    args = ["plan", "--config", RECIPE, *JOB, "--json", "--gpu-memory", "141GB", "train.recompute=selective"]
    assert main(args) == 2  # 137 GB of 141 leaves less than the 10% margin
    data = json.loads(capsys.readouterr().out)
    assert [s["fits"] for s in data["stages"]] == [True, False] and data["gpu_memory_bytes"] == 141e9
    assert {i["name"] for i in data["stages"][0]["items"]} >= {"student weights", "gradients", "optimizer",
                                                                "frozen teacher", "activations", "teacher logits"}
    assert parse_size("141GiB") == 141 * 2**30 and parse_size("80G") == 80e9


def _launch_args(**kw) -> argparse.Namespace:
    base = dict(profile=None, config=RECIPE, nodes=8, gpus_per_node=8, tasks_per_node=None, cpus_per_task=16,
                time="240", partition=None, account=None, qos=None, job_name="j", signal_before=None,
                max_requeues=20, folder=None, overrides=[], gpu_memory="80GB", fs_bandwidth=None)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_launch_plans_first_and_sizes_the_stop_signal():
    from megatron_elastic.slurm.cli import build_request, plan_request

    def planned(args):
        req = build_request(args)
        plan_request(req, args)  # after the cluster checks, before anything is submitted
        return req

    req = planned(_launch_args())
    assert req.plan.fits and req.signal_s == max(120, req.plan.signal_s)
    assert any("elastic.parent" in m for m in req.missing_inputs)  # a warning in a dry run, an error on submit
    with pytest.raises(UserError, match=r"^the job does not fit: stage 2 \(49,152 tokens\) needs .* set train.recompute=full$"):
        planned(_launch_args(overrides=["train.recompute=selective"]))
    with pytest.raises(UserError, match=r"^--signal-before 30 leaves too little time to checkpoint: the plan needs \d+ s"):
        planned(_launch_args(signal_before=30))
