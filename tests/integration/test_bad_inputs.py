"""A catalogue of malformed inputs across every command: each must end with exit code 2, exactly one
line on stderr naming the problem, and the file tree exactly as it was (paths, sizes, mtimes), before
any compute.

The command line runs in-process (``megatron_elastic.cli.main``) so that the whole catalogue costs
seconds; two cases run the console script as a real process, where a deep stack or an undecodable file
would show as a traceback. Shared inputs (a native parent, a Hugging Face copy, a many-in-one checkpoint,
run directories with a checkpoint) are written once per module; each case adds its own bad file in its
own tmp directory.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, cli

from megatron_elastic.checkpoint.native import write_manifest
from megatron_elastic.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PREFIX = "megatron-elastic: error: "


@pytest.fixture(scope="module")
def shared(tmp_path_factory, native_dir):
    """Inputs every case may read (never write): native, hf, many, run (a plain run with a checkpoint),
    erun (an elastic run whose checkpoint's elastic.json is corrupt)."""
    from manyinone_helpers import write_many_in_one

    from megatron_elastic.checkpoint.native import save_checkpoint
    from megatron_elastic.config import dump_config, load_config
    from megatron_elastic.model import HybridLM, preset

    root = tmp_path_factory.mktemp("bad-inputs")
    assert main(["convert", "to-hf", str(native_dir), str(root / "hf")]) == 0
    write_many_in_one(root / "many")
    model = HybridLM(preset("tiny"))
    for name, extra in (("run", None), ("erun", {"elastic.json": "{not json"})):
        cfg = load_config(CONFIG, [f"run_dir={root / name}"])
        optimizer = torch.optim.AdamW(model.parameters())
        save_checkpoint(root / name / "checkpoints", step=1, model=model, optimizer=optimizer,
                        trainer_state={"step": 1, "consumed_samples": 8}, config_yaml=dump_config(cfg), keep_last=2,
                        extra=extra)  # fmt: skip
    return {"native": native_dir, "hf": root / "hf", "many": root / "many", "run": root / "run",
            "erun": root / "erun", "roots": [root, native_dir.parent]}  # fmt: skip


def snapshot(*roots: Path) -> dict:
    return {str(p): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for root in roots for p in [root, *root.rglob("*")]}  # fmt: skip


def put(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def copy(src: Path, dst: Path, **edits) -> Path:
    """A copy of model directory ``src`` whose metadata (native) or config.json (hf) gets ``edits``."""
    shutil.copytree(src, dst)
    name = "megatron_elastic.json" if (dst / "megatron_elastic.json").is_file() else "config.json"
    meta = json.loads((dst / name).read_text())
    target = meta["model"] if name == "megatron_elastic.json" else meta
    for key, value in edits.items():
        if value is KeyError:
            target.pop(key)
        else:
            target[key] = value
    (dst / name).write_text(json.dumps(meta))
    return dst


def edited_run(src: Path, dst: Path, name: str, content) -> Path:
    """A copy of run directory ``src`` whose checkpoint file ``name`` is replaced, its manifest rewritten
    to match (as someone who altered the checkpoint would do): only the file's own check can catch it."""
    shutil.copytree(src, dst)
    step = dst / "checkpoints" / "step_00000001"
    put(step / name, content)
    (step / "manifest.json").unlink()
    write_manifest(step)
    return dst


def many_with(src: Path, dst: Path, content) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "elastic.json").read_text())
    if callable(content):
        content(meta)
        content = json.dumps(meta)
    put(dst / "elastic.json", content)
    return dst


STEP_WORD = json.dumps({"step": "one", "consumed_samples": 8})


def deep(n: int) -> str:
    return "[" * n + "]" * n


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))  # fmt: skip


def resume(s, t, name, content):
    return train(s, t, f"run_dir={edited_run(s['run'], t / 'r', name, content)}")


def from_hf(s, t, **edits):
    return ["convert", "from-hf", str(copy(s["hf"], t / "h", **edits)), str(t / "o")]


def to_hf(s, t, **edits):
    return ["convert", "to-hf", str(copy(s["native"], t / "n", **edits)), str(t / "o")]


def train(s, t, *extra, config=CONFIG):
    return ["train", "--config", str(config), f"run_dir={t / 'run'}", f"data.cache_dir={t / 'cache'}", *extra]


def elastic(s, t, parent, *extra, run=None):
    return train(s, t, "elastic.parent=" + str(parent), "elastic.budgets=[1.0, 0.5]", "elastic.mamba_heads=[1.0, 0.75, 0.5]",
                 *extra, *([f"run_dir={run}"] if run else []))  # fmt: skip


def break_arch(meta):
    first = next(iter(meta["architectures"]))
    del meta["architectures"][first]["hidden_size"]


def bad_layer(meta):
    first = next(iter(meta["architectures"]))
    meta["architectures"][first]["layers"][0]["ffn_hidden_size"] = "wide"


# (id, argv from (shared, tmp), the problem the one line must name)
CASES = [
    # ---- train: the YAML config file, read as bytes first
    ("yaml-binary", lambda s, t: train(s, t, config=put(t / "c.yaml", b"\xff\xfe\x00\x80garbage")), "is not UTF-8"),
    ("yaml-nul", lambda s, t: train(s, t, config=put(t / "c.yaml", "model:\n  preset: tiny\x00\n")), "NUL bytes"),
    ("yaml-deep", lambda s, t: train(s, t, config=put(t / "c.yaml", "a: " + deep(50_000))), "nested deeper than 32"),
    ("yaml-anchor-bomb", lambda s, t: train(s, t, config=put(t / "c.yaml", BOMB + "run_dir: *i\n")),
     "expands to more than 100,000 values"),
    ("yaml-recursive-alias", lambda s, t: train(s, t, config=put(t / "c.yaml", "model: &m\n  x: *m\n")),
     "used inside itself"),
    ("yaml-too-large", lambda s, t: train(s, t, config=put(t / "c.yaml", "# " + "x" * (1 << 20))), "more than a config may"),
    ("yaml-syntax", lambda s, t: train(s, t, config=put(t / "c.yaml", "model: [tiny\n")), "is not valid YAML"),
    ("yaml-list-top", lambda s, t: train(s, t, config=put(t / "c.yaml", "- model\n- train\n")), "must hold a mapping"),
    ("yaml-section-scalar", lambda s, t: train(s, t, config=put(t / "c.yaml", "model: {preset: tiny}\ntrain: 5\n")),
     "config section 'train' must be a mapping"),
    ("yaml-pattern-list", lambda s, t: train(s, t, config=put(t / "c.yaml", "model: {preset: tiny, pattern: [M, '-']}\n")),
     "model.pattern=['M', '-'] is invalid; it must be a string"),
    ("yaml-preset-mapping", lambda s, t: train(s, t, config=put(t / "c.yaml", "model: {preset: {a: 1}}\n")),
     "model.preset={'a': 1} is invalid"),
    ("yaml-missing", lambda s, t: train(s, t, config=t / "none.yaml"), "does not exist"),
    ("yaml-unknown-key", lambda s, t: train(s, t, "train.learning_rate=1"), "unknown config key 'train.learning_rate'"),
    # ---- train: values (floats finite, integers bounded and typed)
    ("hidden-20-digits", lambda s, t: train(s, t, "model.hidden_size=12345678901234567890"), "is out of range"),
    ("hidden-no-memory", lambda s, t: train(s, t, "model.hidden_size=100000000"), "GiB free"),
    ("lr-nan", lambda s, t: train(s, t, "train.lr=.nan"), "train.lr=nan is invalid; it must be a finite number"),
    ("lr-inf", lambda s, t: train(s, t, "train.lr=.inf"), "train.lr=inf is invalid; it must be a finite number"),
    ("min-lr-minus-inf", lambda s, t: train(s, t, "train.min_lr=-.inf"), "train.min_lr=-inf is invalid"),
    ("adam-eps-nan-string", lambda s, t: train(s, t, "train.adam_eps=nan"), "train.adam_eps=nan is invalid"),
    ("clip-overflow", lambda s, t: train(s, t, f"train.clip_grad={10 ** 400}"), "train.clip_grad="),
    ("max-steps-word", lambda s, t: train(s, t, "train.max_steps=seven"), "train.max_steps='seven' is invalid"),
    ("max-steps-bool", lambda s, t: train(s, t, "train.max_steps=true"), "train.max_steps=True is invalid"),
    ("micro-batch-zero", lambda s, t: train(s, t, "train.micro_batch_size=0"), "must be a positive integer"),
    ("seq-len-fraction", lambda s, t: train(s, t, "data.seq_len=1.5"), "data.seq_len=1.5 is invalid"),
    ("seed-negative", lambda s, t: train(s, t, "train.seed=-1"), "train.seed=-1 is invalid"),
    ("precision-unknown", lambda s, t: train(s, t, "train.precision=fp8"), "train.precision='fp8' is invalid"),
    ("backend-unknown", lambda s, t: train(s, t, "tracking.backends=[wandb]"), "tracking.backends contains 'wandb'"),
    ("norm-eps-inf", lambda s, t: train(s, t, "model.norm_eps=.inf"), "model.norm_eps=inf is invalid"),
    ("conv-bias-int", lambda s, t: train(s, t, "model.mamba_conv_bias=1"), "model.mamba_conv_bias=1 is invalid"),
    ("dt-limit-reversed", lambda s, t: train(s, t, "model.mamba_dt_limit=[1.0, 0.5]"), "model.mamba_dt_limit=[1.0, 0.5]"),
    ("dt-limit-word", lambda s, t: train(s, t, "model.mamba_dt_limit=abc"), "model.mamba_dt_limit='abc' is invalid"),
    ("pattern-long-value-cut", lambda s, t: train(s, t, "model.pattern=" + "Q" * 200_000), "has unknown symbol 'Q'"),
    ("stage-weights-nan", lambda s, t: elastic(s, t, s["native"], "distill.stage1_weights=[.nan, 1]"),
     "distill.stage1_weights=nan is invalid"),
    ("budgets-nan", lambda s, t: elastic(s, t, s["native"], "elastic.budgets=[1.0, .nan]"), "elastic.budgets="),
    ("override-no-equals", lambda s, t: train(s, t, "train.lr"), "bad override 'train.lr'"),
    ("override-deep-value", lambda s, t: train(s, t, "train.lr=" + deep(50_000)), "nested deeper than 32"),
    # ---- train: device, outputs and resume, checked before data
    ("run-dir-bool", lambda s, t: train(s, t, "run_dir=true"), "run_dir=True is invalid; it must be a string"),
    ("device-cuda-missing", lambda s, t: train(s, t, "train.device=cuda"), "no CUDA device is available"),
    ("run-dir-under-file", lambda s, t: train(s, t, f"run_dir={put(t / 'f', 'x')}/run"), "is a file, not a directory"),
    ("run-dir-is-file", lambda s, t: train(s, t, f"run_dir={put(t / 'f', 'x')}"), "is a file, not a directory"),
    ("cache-dir-under-file", lambda s, t: train(s, t, f"data.cache_dir={put(t / 'f', 'x')}/c"), "data.cache_dir"),
    ("resume-garbage-optimizer", lambda s, t: resume(s, t, 'optimizer.pt', b'garbage'),
     "optimizer.pt is unreadable"),
    ("resume-garbage-rng", lambda s, t: resume(s, t, 'rng.pt', b'PK garbage'),
     "rng.pt is unreadable"),
    ("resume-corrupt-trainer-state", lambda s, t: resume(s, t, 'trainer_state.json', '{x'),
     "is not valid JSON"),
    ("resume-step-word", lambda s, t: resume(s, t, 'trainer_state.json', STEP_WORD),
     "trainer_state.json has step='one', not a count"),
    ("resume-corrupt-metadata", lambda s, t: resume(s, t, 'megatron_elastic.json', b'{'),
     "is not valid JSON"),
    ("resume-damaged", lambda s, t: train(s, t, f"run_dir={put_damaged(s['run'], t / 'r')}"), "no usable checkpoint"),
    ("resume-other-shape", lambda s, t: train(s, t, f"run_dir={s['run']}", "model.ffn_hidden_size=256"),
     "into a different model shape"),
    ("resume-corrupt-elastic-json", lambda s, t: elastic(s, t, s["native"], run=s["erun"]), "elastic metadata"),
    ("elastic-parent-missing", lambda s, t: elastic(s, t, t / "nope"), "elastic.parent"),
    ("elastic-parent-dt-limit", lambda s, t: elastic(s, t, copy(s["native"], t / "p", mamba_dt_limit="abc")),
     "model.mamba_dt_limit='abc' is invalid"),
    # ---- convert from-hf: config.json
    ("hf-garbage-json", lambda s, t: ["convert", "from-hf", str(put_file(s["hf"], t / "h", "config.json", b"\xff{")),
                                      str(t / "o")], "is not valid JSON"),
    ("hf-deep-json", lambda s, t: ["convert", "from-hf", str(put_file(s["hf"], t / "h", "config.json", deep(100_000))),
                                   str(t / "o")], "is not valid JSON"),
    ("hf-layers-word", lambda s, t: from_hf(s, t, num_hidden_layers="seven"), "num_hidden_layers='seven' is invalid"),
    ("hf-layers-mismatch", lambda s, t: from_hf(s, t, num_hidden_layers=5), "num_hidden_layers=5 but the layer pattern has 7"),
    ("hf-dt-word", lambda s, t: from_hf(s, t, time_step_min="small"), "time_step_min='small' is invalid"),
    ("hf-bias-string", lambda s, t: from_hf(s, t, use_conv_bias="false"), "use_conv_bias='false' is invalid"),
    ("hf-hidden-huge", lambda s, t: from_hf(s, t, hidden_size=10 ** 20), "hidden_size=100000000000000000000 is out of range"),
    ("hf-hidden-float", lambda s, t: from_hf(s, t, hidden_size=128.0), "hidden_size=128.0 is invalid"),
    ("hf-vocab-missing", lambda s, t: from_hf(s, t, vocab_size=KeyError), "lacks 'vocab_size'"),
    ("hf-eps-infinite", lambda s, t: from_hf(s, t, layer_norm_epsilon=float("inf")), "layer_norm_epsilon=inf is invalid"),
    ("hf-dst-under-file", lambda s, t: ["convert", "from-hf", str(s["hf"]), f"{put(t / 'f', 'x')}/o"], "is a file"),
    ("hf-dst-exists", lambda s, t: ["convert", "from-hf", str(s["hf"]), str(s["native"])], "already exists"),
    # ---- convert to-hf / info / prune: native metadata
    ("native-dt-limit-word", lambda s, t: to_hf(s, t, mamba_dt_limit="abc"), "model.mamba_dt_limit='abc' is invalid"),
    ("native-dt-limit-short", lambda s, t: to_hf(s, t, mamba_dt_limit=[0.1]), "model.mamba_dt_limit=[0.1] is invalid"),
    ("native-hidden-string", lambda s, t: to_hf(s, t, hidden_size="128"), "model.hidden_size='128' is invalid"),
    ("native-eps-infinite", lambda s, t: to_hf(s, t, norm_eps=float("inf")), "model.norm_eps=inf is invalid"),
    ("native-bias-string", lambda s, t: to_hf(s, t, mlp_bias="no"), "model.mlp_bias='no' is invalid"),
    ("to-hf-dst-under-file", lambda s, t: ["convert", "to-hf", str(s["native"]), f"{put(t / 'f', 'x')}/o"], "is a file"),
    ("info-pattern-list", lambda s, t: ["info", str(copy(s["native"], t / "n", pattern=["M", "-"]))],
     "layer pattern ['M', '-'] is invalid; it must be a string"),
    ("prune-hidden-word", lambda s, t: ["prune", "--checkpoint", str(s["native"]), "--out", str(t / "o"), "--hidden", "half"],
     "--hidden 'half' is not a number"),
    ("prune-out-under-file", lambda s, t: ["prune", "--checkpoint", str(s["native"]), "--out", f"{put(t / 'f', 'x')}/o",
                                           "--hidden", "0.5"], "is a file"),
    # ---- extract / generate / eval: many-in-one elastic.json
    ("extract-arch-missing-key", lambda s, t: ["extract", "--checkpoint", str(many_with(s["many"], t / "m", break_arch)),
                                               "--all", "--out", str(t / "o")], "is malformed"),
    ("extract-arch-bad-size", lambda s, t: ["extract", "--checkpoint", str(many_with(s["many"], t / "m", bad_layer)),
                                            "--all", "--out", str(t / "o")], "ffn_hidden_size='wide' is not a positive"),
    ("extract-corrupt-json", lambda s, t: ["extract", "--checkpoint", str(many_with(s["many"], t / "m", "{")), "--all",
                                           "--out", str(t / "o")], "is not valid JSON"),
    ("extract-out-under-file", lambda s, t: ["extract", "--checkpoint", str(s["many"]), "--all", "--out",
                                             f"{put(t / 'f', 'x')}/o"], "is a file"),
    ("generate-arch-missing-key", lambda s, t: ["generate", "--checkpoint", str(many_with(s["many"], t / "m", break_arch)),
                                                "--prompt", "def"], "is malformed"),
    ("eval-arch-bad-size", lambda s, t: ["eval", "--checkpoint", str(many_with(s["many"], t / "m", bad_layer)), "--out",
                                         str(t / "o"), f"data.cache_dir={t / 'c'}"], "ffn_hidden_size='wide'"),
    ("eval-out-under-file", lambda s, t: ["eval", "--checkpoint", str(s["many"]), "--out", f"{put(t / 'f', 'x')}/o"],
     "is a file"),
    ("eval-data-nan", lambda s, t: ["eval", "--checkpoint", str(s["many"]), "--out", str(t / "o"),
                                    "data.builtin_max_mb=.nan"], "data.builtin_max_mb=nan is invalid"),
    ("eval-set-word", lambda s, t: ["eval", "--checkpoint", str(s["many"]), "--out", str(t / "o"), "--set",
                                    "memory_context=many"], "memory_context='many' is invalid"),
    ("eval-set-value-then-key", lambda s, t: ["eval", "--checkpoint", str(s["many"]), "--out", str(t / "o"), "--set",
                                              "mqar=1", "--set", "mqar.num_pairs=2"], "'mqar' was already set to a value"),
    ("eval-set-bare-section", lambda s, t: ["eval", "--checkpoint", str(s["many"]), "--out", str(t / "o"), "--set",
                                            "eval=1"], "bad setting 'eval=1'; write eval.key=value"),
    # ---- profile
    ("plan-nodes-zero", lambda s, t: ["plan", "--config", "tiny", "--nodes", "0", "--gpus-per-node", "8"],
     "--nodes 0 is invalid; give a positive whole number"),
    ("plan-gpu-memory-no-unit", lambda s, t: ["plan", "--config", "tiny", "--nodes", "1", "--gpus-per-node", "1",
                                              "--gpu-memory", "80"], "--gpu-memory '80' is not a positive size with a unit"),
    ("plan-mfu-percent", lambda s, t: ["plan", "--config", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--mfu", "35"],
     "--mfu 35.0 is above 1"),
    ("plan-world-not-tiled", lambda s, t: ["plan", "--config", "tiny", "--nodes", "3", "--gpus-per-node", "1",
                                           "parallel.tp=2"], "world size 3 is not a multiple of parallel.tp * parallel.pp = 2"),
    ("profile-seq-len-negative", lambda s, t: ["profile", "tiny", "--out", str(t / "p.json"), "--seq-len", "-1"],
     "--seq-len -1 is invalid"),
    ("profile-batch-zero", lambda s, t: ["profile", "tiny", "--out", str(t / "p.json"), "--batch", "0"], "--batch 0"),
    ("profile-repeats-zero", lambda s, t: ["profile", "tiny", "--out", str(t / "p.json"), "--repeats", "0"], "--repeats 0"),
    ("profile-out-under-file", lambda s, t: ["profile", "tiny", "--out", f"{put(t / 'f', 'x')}/p.json"], "is a file"),
    ("profile-out-is-dir", lambda s, t: ["profile", "tiny", "--out", str(t), "--overwrite"], "is a directory, not a file"),
    ("profile-model-dt-limit", lambda s, t: ["profile", str(copy(s["native"], t / "n", mamba_dt_limit={"a": 1})),
                                             "--out", str(t / "p.json")], "model.mamba_dt_limit={'a': 1} is invalid"),
    # ---- importance
    ("importance-out-under-file", lambda s, t: ["importance", "--checkpoint", str(s["native"]), "--out",
                                                f"{put(t / 'f', 'x')}/o"], "is a file"),
    ("importance-batches-zero", lambda s, t: ["importance", "--checkpoint", str(s["native"]), "--out", str(t / "o"),
                                              "--batches", "0"], "--batches='0' is invalid"),
    ("importance-recipe-binary", lambda s, t: ["importance", "--checkpoint", str(s["native"]), "--out", str(t / "o"),
                                               "--config", str(put(t / "c.yaml", b"\x80\x81"))], "is not UTF-8"),
    # ---- data preprocess
    ("data-prefix-under-file", lambda s, t: ["data", "preprocess", "--input", "builtin", "--tokenizer", "builtin", "--output-prefix",
                                             f"{put(t / 'f', 'x')}/d"], "is a file"),
    # ---- tracking sync
    ("tracking-config-binary", lambda s, t: ["tracking", "sync", str(put(t / "r" / "config.yaml", b"\xff\xfe").parent)],
     "is not UTF-8"),
    ("tracking-config-no-section", lambda s, t: ["tracking", "sync", str(put(t / "r" / "config.yaml", "tracking: 5\n").parent)],
     "has no valid tracking section"),
    ("tracking-timeout-zero", lambda s, t: ["tracking", "sync", str(s["run"]), "--timeout", "0"], "--timeout 0 is invalid"),
    # ---- launch (Slurm) and study: their recipes go through the same loader
    ("launch-lr-nan", lambda s, t: ["launch", "slurm", "--config", str(CONFIG), "--dry-run", f"run_dir={t / 'r'}",
                                    "train.lr=.nan"], "train.lr=nan is invalid"),
    ("launch-config-deep", lambda s, t: ["launch", "slurm", "--config", str(put(t / "c.yaml", "a: " + deep(5000))),
                                         "--dry-run"], "nested deeper than 32"),
    ("study-config-bomb", lambda s, t: ["study", "--config", str(put(t / "s.yaml", BOMB))], "expands to more than"),
]


def put_damaged(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "checkpoints" / "step_00000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    return dst


def put_file(src: Path, dst: Path, name: str, content) -> Path:
    shutil.copytree(src, dst)
    put(dst / name, content)
    return dst


def test_the_catalogue_covers_every_command(shared, tmp_path):
    """At least 60 cases, and each command of ``megatron-elastic --help`` has some (but demo, whose
    output directory is replaced on purpose)."""
    import argparse

    from megatron_elastic.cli import build_parser

    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    used = {argv(shared, tmp_path / name)[0] for name, argv, _ in CASES}
    assert set(sub.choices) - used == {"demo"}


@pytest.mark.filterwarnings("error::UserWarning")  # a warning would be a second line on stderr
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, shared, tmp_path, capfd):
    name, argv, needle = case
    if name == "device-cuda-missing" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [str(a) for a in argv(shared, tmp_path)]
    capfd.readouterr()
    before = snapshot(tmp_path, *shared["roots"])
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capfd.readouterr()
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(PREFIX) and needle in lines[0], lines[0][:1200]
    assert len(lines[0]) <= 1100, len(lines[0])  # long values are cut
    assert snapshot(tmp_path, *shared["roots"]) == before


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x80garbage", ("a: " + deep(50_000)).encode()], ids=["binary", "deep"])
def test_bad_config_in_a_real_process(cli_exe, tmp_path, content):
    """What a traceback would show only in a real process (a stack overflow, an encoding error at exit)."""
    config = put(tmp_path / "c.yaml", content)
    before = snapshot(tmp_path)
    r = cli(cli_exe, "train", "--config", str(config), f"run_dir={tmp_path / 'run'}", timeout=120)
    assert_user_error(r, "is not UTF-8" if content.startswith(b"\xff") else "nested deeper than 32", tmp_path / "run")
    assert snapshot(tmp_path) == before
