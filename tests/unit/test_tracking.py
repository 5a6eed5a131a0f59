"""Tracking pieces without a server: credential redaction, MLflow param limits, the spool file, the
FLOP estimate behind MFU, the one-rank switch of build_trackers."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_elastic.config import load_config
from megatron_elastic.model import HybridLM, preset
from megatron_elastic.tracking import build_trackers, flatten
from megatron_elastic.tracking.mlflow_backend import Redactor, config_hash, config_params
from megatron_elastic.tracking.perf import forward_flops_per_token, throughput_metrics
from megatron_elastic.tracking.spool import Spool
from megatron_elastic.utils.redact import redact

SECRET_URIS = [
    ("https://alice:pa55w0rd@mlflow.example.com:5000", ["pa55w0rd", "alice:pa55w0rd"]),
    ("http://bob:s%40cret%21@10.0.0.7/mlflow", ["s%40cret%21", "s@cret!"]),
    ("https://mlflow.example.com/?token=tok-123456&experiment=1", ["tok-123456"]),
    ("https://mlflow.example.com/api?access_token=AbC9xYz&sig=deadbeef", ["AbC9xYz", "deadbeef"]),
    ("databricks://user:dapiXYZ123@workspace", ["dapiXYZ123"]),
]


@pytest.mark.parametrize("uri,secrets", SECRET_URIS)
def test_redaction_hides_credentials_in_every_message(uri, secrets):
    hide = Redactor(uri)
    messages = [
        uri,
        f"[mlflow] tracking to run abc at {uri}",
        f"API request to {uri}/api/2.0/mlflow/runs/log-batch failed with exception ConnectionError",
        f"HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: {uri} (Caused by ...)",
        f"🏃 View run r at: {uri}/#/experiments/1/runs/2",
        json.dumps({"tracking": {"mlflow_uri": uri}}),
        f"tracking:\n  mlflow_uri: {uri}\n",
    ]
    for text in messages:
        out = hide(text)
        for s in secrets:
            assert s not in out, (text, out)
        assert "***" in out
    # a message that quotes only the password (e.g. a server echoing it) is covered by the literal list
    literal = next(s for s in secrets if "%" not in s and ":" not in s)
    assert literal not in hide(f"bad credentials {literal!r}")
    # the plain function covers user:password@ and token-like query values of any URI
    for s in secrets:
        if s in uri and ":" not in s:
            assert s not in redact(f"see {uri} for details")


def test_redaction_keeps_harmless_text():
    text = "http://127.0.0.1:5000/api/2.0/mlflow/runs/get?run_id=abc&experiment_id=3 step 12 loss 3.14"
    assert redact(text) == text
    assert Redactor("http://127.0.0.1:5000")(text) == text
    assert Redactor("").secrets == []


def test_params_within_mlflow_limits():
    cfg = load_config("tiny", ["tracking.mlflow_uri=https://u:hunter22@mlflow.example.com",
                                       "tracking.run_name=" + "r" * 7000])  # fmt: skip
    config = cfg.to_dict()
    flat = flatten(config)
    params = config_params(config, Redactor(cfg.tracking.mlflow_uri), limit=500)
    assert list(params) == list(flat)  # one param per flattened setting, same order
    assert all(len(v) <= 500 and len(k) <= 250 for k, v in params.items())
    assert params["tracking.run_name"].endswith("...") and len(params["tracking.run_name"]) == 500
    assert params["tracking.mlflow_uri"] == "https://***@mlflow.example.com"
    assert all("hunter22" not in v for v in params.values())
    assert params["train.lr"] == json.dumps(flat["train.lr"]) and params["tracking.backends"] == '["console"]'
    # the hash does not depend on the credentials, only on the rest of the config
    other = load_config("tiny", ["tracking.mlflow_uri=https://u:other@mlflow.example.com",
                                         "tracking.run_name=" + "r" * 7000])  # fmt: skip
    assert config_hash(config) == config_hash(other.to_dict())
    assert config_hash(config) != config_hash(load_config("tiny", ["train.lr=1e-3"]).to_dict())


def test_spool_keeps_order_and_drops_delivered_records(tmp_path):
    spool = Spool(tmp_path)
    assert spool.is_empty() and spool.read() == []
    for i in range(5):
        spool.append({"kind": "metrics", "step": i, "values": {"loss": float(i)}})
    with open(spool.path, "a") as f:  # a line cut by a kill
        f.write('{"kind": "metr')
    assert [r["step"] for r in spool.read()] == [0, 1, 2, 3, 4]
    spool.drop_first(2)
    assert [r["step"] for r in spool.read()] == [2, 3, 4]
    spool.append({"kind": "status", "status": "FINISHED"})
    assert [r.get("step", r.get("status")) for r in spool.read()] == [2, 3, 4, "FINISHED"]
    spool.drop_first(4)
    assert spool.is_empty() and not spool.path.exists()
    with spool.replay_lock() as first, spool.replay_lock() as second:
        assert first and not second  # one replayer at a time, the other one spools


def test_flops_estimate_against_counted_flops():
    """Our per-token forward FLOPs against torch's FLOP counter on the real model: the weight
    matmuls match within 2%; the total is a lower bound within 10% (the Mamba scan is left out)."""
    cfg = preset("tiny")
    model = HybridLM(cfg).eval()
    seq = 128
    tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    counted = counter.get_total_flops() / tokens.numel()
    matmuls = counter.get_flop_counts()["Global"][torch.ops.aten.mm] / tokens.numel()
    ours = forward_flops_per_token(cfg, seq)
    attention = ours - forward_flops_per_token(cfg, 0)
    assert attention == 4 * seq * cfg.num_attention_heads * cfg.head_dim * cfg.layer_types.count("*")
    assert abs(forward_flops_per_token(cfg, 0) / matmuls - 1) < 0.02, (matmuls, ours)
    assert 0.9 * counted <= ours <= counted, (counted, ours)


def test_mfu_needs_a_known_peak():
    cpu = torch.device("cpu")
    out = throughput_metrics(1000.0, 6e6, device=cpu, configured_tflops=0.5)
    assert out["tflops"] == pytest.approx(6e9 / 1e12) and out["mfu"] == pytest.approx(6e9 / 0.5e12)
    assert out["memory/rss_gib"] > 0.01
    assert "mfu" not in throughput_metrics(1000.0, 6e6, device=cpu)  # no datasheet for a CPU
    halved = throughput_metrics(1000.0, 6e6, device=cpu, num_devices=2, configured_tflops=0.5)
    assert halved["mfu"] == pytest.approx(out["mfu"] / 2)


def test_only_the_reporting_rank_gets_trackers():
    cfg = load_config("tiny", ["tracking.backends=[console,mlflow]"])
    assert [type(t).__name__ for t in build_trackers(cfg).trackers] == ["ConsoleTracker", "MLflowTracker"]
    assert build_trackers(cfg, enabled=False).trackers == []


def test_tracking_config_errors():
    from megatron_elastic.errors import ConfigError

    with pytest.raises(ConfigError, match="mlflow_timeout_s=0 must be >= 1"):
        load_config("tiny", ["tracking.mlflow_timeout_s=0"])
