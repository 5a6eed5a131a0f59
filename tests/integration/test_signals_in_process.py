"""A stop signal that arrives during the last step (here: while its checkpoint is written) does not
turn a finished run into a requeue: the run ends with exit code 0 and its final validation, in
process, with the real signal handler."""

import os
import signal

from megatron_elastic.config import load_config
from megatron_elastic.training.data_setup import build_training_data
from megatron_elastic.training.trainer import Trainer

FAST = ["data.seq_len=64", "data.builtin_max_mb=0.5", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.warmup_steps=1", "train.log_interval=1", "train.eval_batches=1", "train.max_steps=2"]  # fmt: skip


class SignalledAtTheEnd(Trainer):
    def save(self):
        path = super().save()
        if self.step == self.cfg.train.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's own StopFlag
        return path


def test_stop_during_the_last_step_finishes_the_run(cache, tmp_path):
    cfg = load_config("tiny", [*FAST, f"run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}"])
    trainer = SignalledAtTheEnd(cfg, build_training_data(cfg, log=lambda m: None))
    previous = signal.getsignal(signal.SIGTERM)
    result = trainer.fit()
    assert result.exit_code == 0 and result.step == 2 and result.val_loss is not None
    assert signal.getsignal(signal.SIGTERM) is previous  # the loop's handler is gone again
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
