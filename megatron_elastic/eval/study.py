"""The study: the method against its alternatives, on one tiny parent, end to end and seeded.

Stages (``megatron-elastic study --config configs/study-tiny.yaml``):

1. pretrain the parent on the built-in corpus (Python source);
2. recall fine-tuning: continue training it with every ``recall.mix_every``-th micro-batch an MQAR
   batch, so the tiny parent can do associative recall at all;
3. importance ranking and permutation of that parent (it is the teacher from here on);
4. nested elastic distillation, once without and once with ``elastic.protect_attention``; every
   ``elastic.mix_every``-th micro-batch is MQAR (as in every later training run), so recall is
   part of what is distilled;
5. baselines for every budget below 1.0, on the unprotected run's child architectures and token
   budget (see :mod:`.baselines`): one-shot pruning, separate distillation (the nested run's
   tokens split evenly over the children, so the total is equal), depth-only pruning by block
   influence, the child shape trained from scratch with the separate runs' tokens;
6. one evaluation of every model (:mod:`.harness`); ``results`` (Markdown tables), the plots in
   ``images`` and ``WORK_DIR/results.json``.

Token accounting counts the input tokens each run reads (text and MQAR); the parent's pretraining
and recall fine-tuning are shared by every method and reported once.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from megatron_elastic.errors import UserError
from megatron_elastic.eval.study_config import StudyConfig

AXES_ONE = ("hidden", "ffn", "attn_heads", "mamba_heads", "mamba_head_dim", "depth")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _latest(run_dir: Path) -> Path:
    from megatron_elastic.checkpoint import native as checkpoint

    path = checkpoint.latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise RuntimeError(f"{run_dir} has no checkpoint after training")
    return path


class Study:
    def __init__(self, cfg: StudyConfig, *, log=_say):
        self.cfg = cfg
        self.log = log
        self.work = Path(cfg.work_dir)
        self.cache = self.work / "cache"
        self.common = [f"data.cache_dir={self.cache}", *cfg.data]
        self.times: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Every recipe, override and input checked before any compute."""
        from megatron_elastic.config import load_config
        from megatron_elastic.eval.shift import shift_files

        c = self.cfg
        self.parent_cfg = load_config(c.parent.recipe, [*self.common, *c.parent.overrides, f"run_dir={self.work / 'parent'}"])
        # The elastic recipe takes its model from a parent that does not exist yet: check it on the preset.
        self.elastic_probe = load_config(c.elastic.recipe, ["model.preset=tiny", "elastic.parent=unused", *self.common,
                                                            *c.elastic.overrides])  # fmt: skip
        c.eval.validate(self.parent_cfg.model.vocab_size)
        if "shift" in c.eval.tasks:
            shift_files(c.eval.shift_data)
        for path in (Path(c.results), Path(c.images)):
            if path.exists() and path.is_dir() != (path == Path(c.images)):
                raise UserError(f"{str(path)!r} exists and is not a {'directory' if path == Path(c.images) else 'file'}; "
                                "choose another path")  # fmt: skip

    # ------------------------------------------------------------------ stages
    def _timed(self, name: str):
        study = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()
                study.log(f"\n[study] {name}")

            def __exit__(self, *exc):
                study.times[name] = time.perf_counter() - self.t0
                if exc[0] is None:
                    study.log(f"[study] {name}: {study.times[name]:.0f}s")

        return _T()

    def _mixed(self, data, run_cfg, every: int, stream: int):
        from megatron_elastic.eval.mqar import MixedLoader

        data.train_loader = MixedLoader(data.train_loader, self.cfg.eval.mqar, every=every,
                                        micro_batch_size=run_cfg.train.micro_batch_size,
                                        seed=self.cfg.seed * 1000 + stream)  # fmt: skip
        return data.train_loader

    def pretrain_parent(self) -> Path:
        c = self.cfg
        from megatron_elastic.config import load_config
        from megatron_elastic.training.run import run_training

        run = self.work / "parent"
        result = run_training(load_config(c.parent.recipe, [*self.common, *c.parent.overrides, f"run_dir={run}",
                                                            f"train.seed={1234 + c.seed}"]))  # fmt: skip
        if result.exit_code:
            raise RuntimeError(f"pretraining the parent failed (exit code {result.exit_code})")
        cfg = self.parent_cfg
        self.tokens["parent"] = cfg.train.max_steps * cfg.train.global_batch_size * cfg.data.seq_len
        return _latest(run)

    def recall_finetune(self, parent_ckpt: Path) -> Path:
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.config import load_config
        from megatron_elastic.eval.baselines import ContinueTrainer
        from megatron_elastic.training.data_setup import build_training_data

        c, r = self.cfg, self.cfg.recall
        run = self.work / "recall"
        cfg = load_config(c.parent.recipe, [*self.common, *c.parent.overrides, f"run_dir={run}",
                                            f"train.seed={1234 + c.seed}", f"train.max_steps={r.steps}", f"train.lr={r.lr}",
                                            f"train.min_lr={r.lr / 10}", f"train.warmup_steps={r.warmup_steps}",
                                            "train.eval_interval=0", "train.save_interval=0"])  # fmt: skip
        data = build_training_data(cfg, log=self.log)
        loader = self._mixed(data, cfg, r.mix_every, 1)
        model = load_pretrained(parent_ckpt).train()
        result = ContinueTrainer(cfg, data, model=model).fit()
        if result.exit_code:
            raise RuntimeError(f"recall fine-tuning failed (exit code {result.exit_code})")
        self.tokens["recall fine-tuning"] = loader.text_tokens + loader.mqar_tokens
        return _latest(run)

    def importance(self, ckpt: Path) -> Path:
        from megatron_elastic.training.run import rank_and_permute

        out = self.work / "importance"
        if self.cfg.resume and (out / "ranking.json").is_file():
            self.log(f"[study] resume: reusing {out}")
            return out
        rank_and_permute(ckpt, out, recipe=self.cfg.parent.recipe, overrides=self.common, batches=self.cfg.importance_batches,
                         batch_size=4, seq_len=self.parent_cfg.data.seq_len, log=self.log)  # fmt: skip
        return out

    def elastic_run(self, importance: Path, protect: bool) -> tuple[Path, int, int]:
        """Returns (many-in-one dir, tokens read, optimizer steps)."""
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.config import load_config
        from megatron_elastic.training.data_setup import build_training_data
        from megatron_elastic.training.elastic_trainer import ElasticTrainer
        from megatron_elastic.training.run import resolve_elastic_run

        c = self.cfg
        run = self.work / ("nested-protect" if protect else "nested")
        extra = ["elastic.protect_attention=true", "elastic.attn_heads=[1.0]"] if protect else []
        cfg = load_config(c.elastic.recipe, [f"elastic.parent={importance / 'parent'}", *self.common, *c.elastic.overrides,
                                             *extra, f"run_dir={run}", f"train.seed={1234 + c.seed}"])  # fmt: skip
        resolved = resolve_elastic_run(cfg)
        cfg = resolved.cfg
        data = build_training_data(cfg, log=self.log)
        loader = self._mixed(data, cfg, c.elastic.mix_every, 2)
        parent = load_pretrained(resolved.parent).train()
        result = ElasticTrainer(cfg, data, depth_order=resolved.depth_order, parent=parent).fit()
        if result.exit_code:
            raise RuntimeError(f"elastic run {run} failed (exit code {result.exit_code})")
        self.elastic_cfg = cfg
        return run / "many-in-one", loader.text_tokens + loader.mqar_tokens, cfg.train.max_steps

    def separate(self, importance: Path, key: str, child, steps: int):
        """Distil one child from the parent with ``steps`` optimizer steps (the nested run's batch)."""
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.config import load_config
        from megatron_elastic.eval.baselines import SeparateDistillTrainer
        from megatron_elastic.training.data_setup import build_training_data

        c = self.cfg
        run = self.work / f"separate-{key}"
        ones = [f"elastic.{a}=[1.0]" for a in AXES_ONE]
        cfg = load_config(c.elastic.recipe, [f"elastic.parent={importance / 'parent'}", *self.common, *c.elastic.overrides,
                                             f"run_dir={run}", f"train.seed={1234 + c.seed}", f"train.max_steps={steps}",
                                             "elastic.budgets=[1.0]", *ones, "elastic.protect_attention=false",
                                             "elastic.router_warmup_steps=0", "distill.budgets_per_micro_batch=0",
                                             "distill.stage1_weights=[]", "distill.stage2_weights=[]",
                                             "distill.stage2_start_step=0", "distill.stage2_start_tokens=0",
                                             "train.eval_interval=0", "train.save_interval=0"])  # fmt: skip
        cfg = dataclasses.replace(cfg, model=child.config)
        cfg.validate()
        data = build_training_data(cfg, log=self.log)
        loader = self._mixed(data, cfg, c.elastic.mix_every, 2)
        teacher = load_pretrained(importance / "parent")
        result = SeparateDistillTrainer(cfg, data, child=child.train(), teacher=teacher).fit()
        if result.exit_code:
            raise RuntimeError(f"separate distillation {run} failed (exit code {result.exit_code})")
        return child.eval(), loader.text_tokens + loader.mqar_tokens

    def scratch(self, key: str, child_cfg, steps: int):
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.config import load_config
        from megatron_elastic.training.data_setup import build_training_data
        from megatron_elastic.training.trainer import Trainer

        c, b, e = self.cfg, self.cfg.baselines, self.elastic_cfg
        run = self.work / f"scratch-{key}"
        cfg = load_config(c.parent.recipe, [*self.common, *c.parent.overrides, f"run_dir={run}",
                                            f"train.seed={1234 + c.seed}", f"train.max_steps={steps}",
                                            f"train.micro_batch_size={e.train.micro_batch_size}",
                                            f"train.global_batch_size={e.train.global_batch_size}",
                                            f"data.seq_len={e.data.seq_len}", f"train.lr={b.scratch_lr}",
                                            f"train.min_lr={b.scratch_lr / 10}", f"train.warmup_steps={b.scratch_warmup_steps}",
                                            "train.eval_interval=0", "train.save_interval=0"])  # fmt: skip
        cfg = dataclasses.replace(cfg, model=child_cfg)
        cfg.validate()
        data = build_training_data(cfg, log=self.log)
        loader = self._mixed(data, cfg, c.elastic.mix_every, 2)
        result = Trainer(cfg, data).fit()
        if result.exit_code:
            raise RuntimeError(f"from-scratch run {run} failed (exit code {result.exit_code})")
        return load_pretrained(_latest(run)), loader.text_tokens + loader.mqar_tokens

    # ------------------------------------------------------------------ everything
    def run(self) -> dict:
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.elastic import Architecture, child_config, extract
        from megatron_elastic.elastic.manyinone import read_metadata
        from megatron_elastic.eval.baselines import depth_only_architecture
        from megatron_elastic.eval.harness import build_context, evaluate_models

        c = self.cfg
        start = time.perf_counter()
        self.check()
        if self.work.exists() and not c.resume:
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        with self._timed("1/6 pretrain the parent"):
            parent_ckpt = self.pretrain_parent()
        with self._timed("2/6 recall fine-tuning of the parent"):
            recall_ckpt = self.recall_finetune(parent_ckpt)
        with self._timed("3/6 importance ranking and permutation"):
            importance = self.importance(recall_ckpt)
        teacher = load_pretrained(importance / "parent")
        nested: dict[bool, dict] = {}
        with self._timed("4/6 nested elastic distillation"):
            for protect in c.elastic.protect_attention:
                many, tokens, steps = self.elastic_run(importance, protect)
                meta = read_metadata(many)
                elastic_parent = load_pretrained(many)
                archs = {k: Architecture.from_dict(a) for k, a in meta["architectures"].items()}
                models = {k: extract(elastic_parent, a).eval() for k, a in archs.items()}
                nested[protect] = {"archs": archs, "models": models, "tokens": tokens, "steps": steps,
                                   "cost": meta["achieved_cost_fraction"]}  # fmt: skip
                self.tokens["nested-protect" if protect else "nested"] = tokens
        base = nested[False]
        children = [k for k in base["archs"] if float(k) < 1.0]
        per_child_steps = max(1, base["steps"] // max(1, len(children)))
        methods: dict[str, dict[str, object]] = {"nested": base["models"]}
        if True in nested:
            methods["nested-protect"] = nested[True]["models"]
        full_key = next((k for k in base["archs"] if float(k) == 1.0), None)
        with self._timed("5/6 baselines"):
            for m in c.baselines.methods:
                methods[m] = {}
                self.tokens[m] = 0
            if full_key is not None:  # budget 1.0 of every baseline is the parent itself (the teacher)
                methods["parent"] = {full_key: teacher}
            if "depth-only" in c.baselines.methods:
                from megatron_elastic.utils.io import read_json

                influence = read_json(importance / "ranking.json", "ranking")["scores"]["block_influence"]
            for key in children:
                arch = base["archs"][key]
                if "one-shot" in c.baselines.methods:
                    methods["one-shot"][key] = extract(teacher, arch).eval()
                if "separate" in c.baselines.methods:
                    self.log(f"[study] separate distillation of budget {key} ({per_child_steps} steps)")
                    model, tokens = self.separate(importance, key, extract(teacher, arch), per_child_steps)
                    methods["separate"][key] = model
                    self.tokens["separate"] += tokens
                if "depth-only" in c.baselines.methods:
                    d_arch, dropped = depth_only_architecture(teacher.config, influence, float(key),
                                                              tolerance=c.baselines.depth_tolerance)  # fmt: skip
                    self.log(f"[study] depth-only {key}: drops layers {dropped} (least block influence first)")
                    methods["depth-only"][key] = extract(teacher, d_arch).eval()
                if "scratch" in c.baselines.methods:
                    self.log(f"[study] from scratch, budget {key} ({per_child_steps} steps)")
                    model, tokens = self.scratch(key, child_config(teacher.config, arch), per_child_steps)
                    methods["scratch"][key] = model
                    self.tokens["scratch"] += tokens
        with self._timed("6/6 evaluation"):
            ctx = build_context(self.parent_cfg, c.eval, log=self.log)
            flat = {f"{m}@{k}": model for m, per in methods.items() for k, model in per.items()}
            flat["parent (text only)"] = load_pretrained(parent_ckpt)
            results = evaluate_models(flat, ctx, log=self.log)
        full_params = teacher.num_parameters()
        rows = []
        for name, r in results.items():
            method, _, key = name.partition("@")
            rows.append({"method": method, "budget": float(key) if key else None, "name": name,
                         "param_fraction": r["parameters"] / full_params, **r})  # fmt: skip
        report = {
            "rows": rows,
            "tokens": self.tokens,
            "per_child_steps": per_child_steps,
            "nested_steps": base["steps"],
            "achieved_cost": {("nested-protect" if p else "nested"): v["cost"] for p, v in nested.items()},
            "times_s": self.times,
            "wall_s": time.perf_counter() - start,
            "config": dataclasses.asdict(c),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "parent_params": full_params,
        }
        from megatron_elastic.eval.report import write_report

        write_report(report, results_md=Path(c.results), images=Path(c.images), work=self.work, log=self.log)
        return report
