"""LM PPO under ``accelerate launch`` with two gloo processes on the CPU equals one process.

Each process samples its slice of the global batch, every row seeded by its place in that batch
(:func:`palate.lm.generation.row_seed`), so the two processes together sample exactly the
completions one process samples; the test checks this directly (same scores and lengths). Their
log-probabilities differ only by float rounding (each shard is padded to its own width). Then
two PPO iterations, with whitened scores and advantages, an adaptive beta and two epochs of two
minibatches, must give the one-process losses, beta and trained weights: iteration 2 samples
from the weights iteration 1 produced, so it agrees only if the first update did. Finally the
two-process checkpoint resumes in one process, and its third iteration equals that of a
one-process run resumed from its own checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent("""
    import copy, sys
    from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel
    from palate.lm.testing import tiny_causal_lm
    from palate.runs import seed_everything

    PROMPTS = ["The movie was", "I did not like the food, it was cold", "Write a short poem", "List three colours",
               "Once upon a time", "Thank you! This is", "Explain why the sky", "The quick brown fox"]

    def trainer(iterations):
        cfg = LMPPOConfig(reward_fn="x", batch_size=8, mini_batch_size=4, ppo_epochs=2, iterations=iterations,
                          learning_rate=1e-3, max_new_tokens=6, device="cpu", save_every=1, adaptive_kl=True,
                          kl_target=0.05, kl_horizon=100, whiten_scores=True, seed=5)
        seed_everything(cfg.seed)
        model, tok = tiny_causal_lm(seed=0)
        score = lambda p, c: [float(x.count("e")) + 0.1 * len(x) for x in c]
        return LMPPOTrainer(cfg, model, tok, ValueModel.from_causal_lm(model), score, PROMPTS,
                            lambda p: tok.encode(p), reference=copy.deepcopy(model))

    from pathlib import Path
    mode, run = sys.argv[1], Path(sys.argv[2])
    if mode in ("train", "both"):
        trainer(2).train(run)
    if mode in ("resume", "both"):
        trainer(3).train(run, resume=True)
""")

KEYS = ("objective/reward", "objective/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
        "response/length", "losses/policy_loss", "losses/value_loss", "ppo/clipfrac", "ppo/approx_kl",
        "losses/explained_variance")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir: Path, n: int, mode: str, run: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, str(workdir / "worker.py"), mode, str(run)]
    if n > 1:  # as in test_accelerate.py: --multi_gpu with no GPU present runs MULTI_CPU over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("phase") == "ppo"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["weights"]


def test_two_processes_match_one_and_resume_in_one(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(tmp_path, 1, "train", one)
    _run(tmp_path, 2, "train", two)
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key, a[key], b[key])
    assert m1[1]["objective/kl_coef"] != m1[0]["objective/kl_coef"]  # beta moved, identically
    assert m1[1]["objective/kl"] != 0.0  # iteration 2 sampled from updated weights
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4, msg=name)
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 2
    samples1 = (one / "samples.jsonl").read_text().splitlines()
    samples2 = (two / "samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["completion"] for s in samples1] == [json.loads(s)["completion"] for s in samples2]

    # Resume the two-process checkpoint in one process, and the one-process one alike: iteration 3
    # of both must agree (same weights, optimiser state, beta, prompt order, sampling seeds).
    _run(tmp_path, 1, "resume", one)
    _run(tmp_path, 1, "resume", two)
    r1, r2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2, 3]
    for key in KEYS:
        assert r1[2][key] == pytest.approx(r2[2][key], rel=1e-4, abs=1e-5), (key, r1[2][key], r2[2][key])
    for name, w in _weights(one).items():
        torch.testing.assert_close(w, _weights(two)[name], atol=1e-5, rtol=1e-4, msg=name)
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 1
