"""LM PPO under ``accelerate launch`` with two gloo processes on the CPU equals one process.

Each process samples its slice of the global batch, every row seeded by its place in that batch
(:func:`palate.lm.generation.row_seed`), so the two processes together sample exactly the
completions one process samples; the test checks this directly (same scores and lengths). Their
log-probabilities differ only by float rounding (each shard is padded to its own width). Then
two PPO iterations, with whitened scores and advantages, an adaptive beta and two epochs of two
minibatches, must give the one-process losses, beta and trained weights: iteration 2 samples
from the weights iteration 1 produced, so it agrees only if the first update did. Finally the
two-process checkpoint resumes in one process, and its third iteration equals that of a
one-process run resumed from its own checkpoint. One iteration with LoRA adapters on policy and
value (the reference is the policy with its adapters off), and one training only the top block
from the frozen-prefix cache (whose hidden states are gathered with the rollout), must agree in
the same way. The two
processes are started with the shipped configs/accelerate/ddp.yaml.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

WORKER = textwrap.dedent("""
    import copy, shutil, sys
    from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel
    from palate.lm.trainable import make_trainable
    from palate.lm.testing import tiny_causal_lm
    from palate.runs import seed_everything

    PROMPTS = ["The movie was", "I did not like the food, it was cold", "Write a short poem", "List three colours",
               "Once upon a time", "Thank you! This is", "Explain why the sky", "The quick brown fox"]

    def trainer(iterations, lora=False, top_blocks=0):
        cfg = LMPPOConfig(reward_fn="x", batch_size=8, mini_batch_size=4, ppo_epochs=2, iterations=iterations,
                          learning_rate=1e-2 if lora else 1e-3, max_new_tokens=6, device="cpu", save_every=1,
                          adaptive_kl=True, kl_target=0.05, kl_horizon=100, whiten_scores=True, seed=5,
                          lora_r=4 if lora else 0, trainable_layers=top_blocks)
        seed_everything(cfg.seed)
        model, tok = tiny_causal_lm(seed=0)
        value = ValueModel.from_causal_lm(model)
        reference = None if lora else copy.deepcopy(model)
        model = make_trainable(model, value, cfg.lora_r, 8, top_blocks, top_blocks)
        score = lambda p, c: [float(x.count("e")) + 0.1 * len(x) for x in c]
        return LMPPOTrainer(cfg, model, tok, value, score, PROMPTS, lambda p: tok.encode(p), reference=reference)

    from pathlib import Path
    mode, run = sys.argv[1], Path(sys.argv[2])
    if mode in ("train", "both"):
        trainer(2).train(run)
        trainer(1, lora=True).train(run / "lora")  # LoRA adapters on policy and value
        t = trainer(1, top_blocks=1)  # the top block only, from the frozen-prefix cache
        assert t.unwrapped.policy_start == t.unwrapped.value_start == 1
        t.train(run / "top")
    if mode == "both":  # keep the iteration-2 weights, which the resumed run's checkpoint replaces
        shutil.copy(run / "checkpoint.pt", run / "checkpoint-2.pt")
    if mode in ("resume", "both"):
        trainer(3).train(run, resume=True)
""")

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("objective/reward", "objective/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
        "response/length", "losses/policy_loss", "losses/value_loss", "ppo/clipfrac", "ppo/approx_kl",
        "losses/explained_variance")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir: Path, n: int, mode: str, run: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(workdir / "worker.py"), mode, str(run)]
    if n > 1:  # the shipped DDP config: with no GPU present it runs MULTI_CPU over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
               "--num_processes", str(n), "--main_process_port", str(_free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("phase") == "ppo"]


def _weights(run: Path, name: str = "checkpoint.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, map_location="cpu", weights_only=False)["weights"]


def test_two_processes_match_one_and_resume_in_one(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(tmp_path, 1, "both", one)  # 2 iterations, then resumed in a fresh trainer for a third
    _run(tmp_path, 2, "train", two)
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [1, 2, 3] and [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key, a[key], b[key])
    assert m1[1]["objective/kl_coef"] != m1[0]["objective/kl_coef"]  # beta moved, identically
    assert m1[1]["objective/kl"] != 0.0  # iteration 2 sampled from updated weights
    w1, w2 = _weights(one, "checkpoint-2.pt"), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4, msg=name)
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 2
    for part in ("lora", "top"):
        p1, p2 = _metrics(one / part), _metrics(two / part)
        for key in KEYS:
            assert p1[0][key] == pytest.approx(p2[0][key], rel=1e-4, abs=1e-5), (part, key, p1[0][key], p2[0][key])
        w1, w2 = _weights(one / part), _weights(two / part)
        for name in w1:
            torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4, msg=f"{part} {name}")
    lora = _weights(two / "lora")
    assert lora and all("lora_" in name for name in lora if "head" not in name)
    assert any(not torch.all(w == 0) for n, w in lora.items() if "lora_B" in n)  # the adapters were trained
    assert all(".layers.1." in n or "norm" in n or "head" in n for n in _weights(two / "top"))
    completions = [[json.loads(s)["completion"] for s in (run / "samples.jsonl").read_text().splitlines()]
                   for run in (one, two)]
    assert completions[0][:len(completions[1])] == completions[1]

    # The two-process checkpoint resumed in one process: its iteration 3 must be the one-process
    # run's (same weights, optimiser state, beta, prompt order and sampling seeds).
    _run(tmp_path, 1, "resume", two)
    r2 = _metrics(two)
    assert [r["step"] for r in r2] == [1, 2, 3]
    for key in KEYS:
        assert m1[2][key] == pytest.approx(r2[2][key], rel=1e-4, abs=1e-5), (key, m1[2][key], r2[2][key])
    for name, w in _weights(one).items():
        torch.testing.assert_close(w, _weights(two)[name], atol=1e-5, rtol=1e-4, msg=name)
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 1


def test_shipped_accelerate_configs_parse() -> None:
    """Each configs/accelerate/*.yaml is read by accelerate's own loader as the kind it claims."""
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}
    for name, kind in kinds.items():
        cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
        assert str(cfg.distributed_type).endswith(kind), (name, cfg.distributed_type)
    assert sorted(p.stem for p in (ROOT / "configs" / "accelerate").glob("*.yaml")) == sorted(kinds)
    assert load_config_from_file(str(ROOT / "configs/accelerate/zero3.yaml")).deepspeed_config["zero_stage"] == 3


# -- the paths for larger runs, checked on the CPU ---------------------------------------------

PROMPTS = ["The movie was", "I did not like the food, it was cold", "Write a short poem", "List three colours"]


@pytest.mark.usefixtures("one_thread")
def test_static_cache_and_compiled_decoding_sample_the_same_tokens() -> None:
    """A fixed seed samples the same completions with the static KV cache and with the decoding
    step compiled (backend ``eager``: dynamo's capture of transformers' compiled path, which the
    inductor backend then turns into kernels) as with the default dynamic cache."""
    from palate.lm.generation import HFGenerate, row_seed
    from palate.lm.testing import tiny_causal_lm

    model, tok = tiny_causal_lm()
    ids = [tok.encode(p) for p in PROMPTS]
    seeds = [row_seed(7, 0, j) for j in range(len(ids))]
    import torch._dynamo

    base, trace = HFGenerate()(model, tok, ids, 8, 1.0, seeds, capture_block=1)
    assert trace is not None and trace.hidden is not None
    for engine in (HFGenerate(static_cache=True), HFGenerate(static_cache=True, compile=True, compile_backend="eager")):
        torch._dynamo.utils.counters.clear()
        batch, other = engine(model, tok, ids, 8, 1.0, seeds, capture_block=1)
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == engine.compile  # compiled iff asked
        assert torch.equal(batch.response_ids, base.response_ids), engine
        assert torch.equal(batch.response_mask, base.response_mask), engine
        torch.testing.assert_close(other.logprobs, trace.logprobs, atol=1e-5, rtol=1e-5)
        assert (other.hidden is None) == engine.compile  # compiled steps keep no block input
    with pytest.raises(ValueError, match="static_cache"):
        HFGenerate(compile=True)


def _tiny_trainer(**overrides):
    import copy

    from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel
    from palate.lm.testing import tiny_causal_lm
    from palate.runs import seed_everything

    cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3,
                      max_new_tokens=6, device="cpu", **overrides)
    seed_everything(0)
    model, tok = tiny_causal_lm(seed=0)
    return LMPPOTrainer(cfg, model, tok, ValueModel.from_causal_lm(model),
                        lambda p, c: [float(x.count("e")) for x in c], PROMPTS, lambda p: tok.encode(p),
                        reference=copy.deepcopy(model))


@pytest.mark.usefixtures("one_thread")
def test_gradient_checkpointing_recomputes_both_networks_and_changes_nothing() -> None:
    """With gradient_checkpointing every block of policy and value runs again in the backward
    pass (twice the block calls of an update), and the update is the same; an iteration logs
    its generation and training throughput and its peak memory."""
    runs = {}
    for on in (False, True):
        trainer = _tiny_trainer(gradient_checkpointing=on)
        ro = trainer.rollout()
        calls = {"policy": 0, "value": 0}
        blocks = {"policy": trainer.unwrapped.policy.model.layers[0], "value": trainer.unwrapped.value.backbone.layers[0]}
        # A block's own hooks stay outside the checkpoint; its MLP is entered again in the
        # recomputation (a pre-hook: the recomputation stops once it has what backward needs).
        hooks = [b.mlp.register_forward_pre_hook(lambda *a, k=k, c=calls: c.__setitem__(k, c[k] + 1))
                 for k, b in blocks.items()]
        stats = trainer.update(ro)
        for h in hooks:
            h.remove()
        runs[on] = (calls, stats, {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()})
        assert all(not b.training for b in blocks.values())  # armed only inside the update
    assert runs[True][0] == {k: 2 * v for k, v in runs[False][0].items()}
    for key in ("pg_loss", "vf_loss", "approx_kl"):
        assert runs[True][1][key] == pytest.approx(runs[False][1][key], rel=1e-5, abs=1e-7), key
    for name, w in runs[True][2].items():
        torch.testing.assert_close(w, runs[False][2][name], atol=1e-6, rtol=1e-5, msg=name)
    metrics, _ = trainer.step()
    for key in ("perf/generation_tokens_per_s", "perf/train_tokens_per_s", "perf/peak_memory_mb"):
        assert metrics[key] > 0, key


@pytest.mark.usefixtures("one_thread")
def test_mixed_precision_bf16_runs_the_rollout_in_bf16() -> None:
    """With mixed_precision bf16 the rollout's log pi is bf16's, not float32's, so the first
    update's ratio starts near 1 instead of off by the precision gap."""
    from palate.lm.generation import response_logprobs

    trainer = _tiny_trainer(mixed_precision="bf16")
    ro = trainer.rollout()
    policy = trainer.unwrapped.policy
    with torch.no_grad():
        fp32 = response_logprobs(policy, ro.batch)
        with trainer.accelerator.autocast():
            bf16 = response_logprobs(policy, ro.batch)
    gap_fp32 = (ro.logprobs - fp32).abs().max()
    assert gap_fp32 > 1e-4  # the rollout was not float32
    assert (ro.logprobs - bf16).abs().max() < gap_fp32
    stats = trainer.update(ro)
    assert all(np.isfinite(v) for v in stats.values())
