"""Atomic directory writes: all or nothing. The streaming safetensors writer: the very bytes of
``safetensors.torch.save_file``, one tensor held at a time."""

import gc
import weakref

import pytest
import torch

from megatron_elastic.errors import UserError
from megatron_elastic.utils.io import atomic_directory, safetensors_order, write_safetensors


def test_success_renames_into_place(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_on_success(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(UserError, match="already exists"):
        with atomic_directory(tmp_path / "out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_streamed_safetensors_equal_save_file_and_hold_one_tensor(tmp_path):
    from safetensors.torch import save_file

    from megatron_elastic.convert.native import save_native
    from megatron_elastic.model import HybridLM, preset

    model = HybridLM(preset("tiny"))
    save_native(model, tmp_path / "native")  # the native writer streams the model's state dict
    save_file(dict(model.state_dict()), str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "native" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (5, 3), "b16": (4,), "h16": (2, 2), "ids": (7,), "flag": (), "empty": (0, 3), "i8": (3,)}
    dtypes = {"w": torch.float32, "b16": torch.bfloat16, "h16": torch.float16, "ids": torch.int64, "flag": torch.bool,
              "empty": torch.float64, "i8": torch.int8}  # fmt: skip
    specs = {k: (dtypes[k], shapes[k]) for k in shapes}
    made = {k: torch.randn(shapes[k], generator=gen).to(dtypes[k]) for k in shapes}
    assert safetensors_order(specs) == ["ids", "empty", "w", "b16", "h16", "i8", "flag"]  # dtype order, then name
    live = []

    def stream():  # makes each tensor only when asked for it, and counts the ones still alive
        for name in safetensors_order(specs):
            t = made[name].clone()
            gc.collect()
            live.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(t))
            yield name, t
            del t

    refs: list = []
    write_safetensors(tmp_path / "streamed.safetensors", specs, stream(), metadata={"format": "pt"})
    save_file(made, str(tmp_path / "mixed.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "mixed.safetensors").read_bytes()
    assert live == [0] * len(specs)  # the writer dropped each tensor before asking for the next

    with pytest.raises(AssertionError, match="where 'ids' comes next"):
        write_safetensors(tmp_path / "bad.safetensors", specs, iter([("w", made["w"])]))
