"""Two processes through ``accelerate launch`` (gloo, CPU) give the one-process losses on the same global batch.

SFT, the reward model and DPO (LM PPO: test_accelerate_ppo.py).

This checks the two conventions of :mod:`palate.lm.training`: ``batch_size`` is the global batch
(each process gets a slice) and losses are global sums over global counts, so the gradient DDP
averages equals the one-process gradient. Step 2's loss is only equal if step 1's update was.
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

WORKER = textwrap.dedent("""
    import sys
    from palate.lm.reward import RMConfig, train_reward_model
    from palate.lm.sft import SFTConfig, train_sft
    from palate.lm.dpo import DPOConfig, train_dpo

    tmp, runs = sys.argv[1], sys.argv[2]
    common = dict(max_steps=2, batch_size=4, lr=5e-3, warmup_ratio=0.0, runs_dir=runs, tensorboard=False, seed=3)
    train_sft(SFTConfig(model=f"{tmp}/tiny", train_data=f"{tmp}/sft.jsonl", val_fraction=0.0, chat=True,
                        eval_every=100, **common))
    train_reward_model(RMConfig(model=f"{tmp}/tiny", train_data=f"{tmp}/cmp.jsonl", val_fraction=0.25,
                                eval_every=100, **common))
    train_dpo(DPOConfig(model=f"{tmp}/tiny", train_data=f"{tmp}/cmp.jsonl", val_fraction=0.25, eval_every=100,
                        beta=0.5, **common))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    from palate.lm.testing import tiny_causal_lm

    model, tok = tiny_causal_lm()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    words = "the sea is blue and the sky is wide and the day is long".split()
    with open(tmp_path / "sft.jsonl", "w") as fh:
        for i in range(8):  # different lengths, so per-process token counts differ
            fh.write(json.dumps({"prompt": f"Say {i} words", "response": " ".join(words[: 2 + i])}) + "\n")
    with open(tmp_path / "cmp.jsonl", "w") as fh:
        for i in range(8):
            k = 2 + i % 3  # K varies (2..4), and one record has a tie
            ranking = list(range(k)) if i != 5 else [0, 1, 1, 2][:k]
            fh.write(json.dumps({"prompt": f"Review {i}:", "completions": [" ".join(words[: j + 1 + i]) for j in range(k)],
                                 "ranking": ranking}) + "\n")
    (tmp_path / "worker.py").write_text(WORKER)
    return tmp_path


def test_two_gloo_processes_match_one_process(workdir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    outputs = {}
    for n in (1, 2):
        runs = workdir / f"runs{n}"
        # accelerate 1.15's `--cpu` flag always runs one process; `--multi_gpu` starts torchrun, and
        # with no GPU present the Accelerator then runs MULTI_CPU over gloo, which is what we test.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(workdir / "worker.py"), str(workdir), str(runs)]
        if n == 1:  # one process needs no launcher: run it directly, as a user would
            cmd = [sys.executable, str(workdir / "worker.py"), str(workdir), str(runs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[n] = runs
    for n, runs in outputs.items():
        assert json.loads((runs / "rm" / "summary.json").read_text())["num_processes"] == n
    for run, key, count in (("sft", "sft/loss", 2), ("rm", "rm/loss", 2), ("rm", "rm/accuracy", 2),
                            ("rm", "rm/val_loss", 1), ("rm", "rm/val_accuracy", 1), ("dpo", "dpo/loss", 2),
                            ("dpo", "dpo/val_loss", 2)):
        one, two = _losses(outputs[1] / run, key), _losses(outputs[2] / run, key)
        assert len(one) == len(two) == count, (key, one, two)
        assert one == pytest.approx(two, rel=1e-4, abs=1e-5), (key, one, two)
    for run, key in (("sft", "sft/loss"), ("dpo", "dpo/loss")):  # step 2 follows a real update
        assert _losses(outputs[1] / run, key)[1] != _losses(outputs[1] / run, key)[0], key


def test_a_second_accelerator_may_change_mixed_precision() -> None:
    """SFT in float32 then a reward model in bf16, in one process (a notebook): accelerate's
    singleton would refuse the second; ``make_accelerator`` starts from fresh settings."""
    from palate.lm.training import make_accelerator

    # Accelerators read the process-wide state, so each is checked before the next is made.
    for precision in ("no", "bf16", "no"):
        assert make_accelerator(cpu=True, mixed_precision=precision).mixed_precision == precision


EVAL_WORKER = textwrap.dedent("""
    import sys
    from palate.lm.config import EvalConfig
    from palate.lm.evaluate import evaluate

    tmp, out = sys.argv[1], sys.argv[2]
    evaluate(EvalConfig(run=f"{tmp}/policy", reference=f"{tmp}/tiny", task="sentiment", n_prompts=3,
                        samples_per_prompt=3, max_new_tokens=5, batch_size=2, ptx_block_size=16, max_ppl_blocks=5,
                        out=out, device="cpu", seed=7))
""")


def test_eval_in_two_gloo_processes_gives_the_one_process_evaluation(workdir: Path) -> None:
    """Each process samples its shard of the 9 (prompt, sample) rows; gathered, the completions,
    the held-out labeller's verdicts, KL and perplexity are those of one process."""
    import torch

    from palate.lm.testing import tiny_causal_lm

    policy, tok = tiny_causal_lm()
    with torch.no_grad():  # a policy that has moved from the reference, so the KL is not 0
        for p in policy.model.layers[-1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    policy.save_pretrained(workdir / "policy")
    tok.save_pretrained(workdir / "policy")
    (workdir / "eval_worker.py").write_text(EVAL_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    outs = {}
    for n in (1, 2):
        out = workdir / f"eval{n}"
        cmd = [sys.executable, str(workdir / "eval_worker.py"), str(workdir), str(out)]
        if n == 2:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *cmd[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n] = out
    one, two = (json.loads((outs[n] / "summary.json").read_text()) for n in (1, 2))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["n_comparisons"] == two["n_comparisons"] == 9
    for key in ("win_rate", "reward", "reward_reference", "kl", "perplexity", "perplexity_reference",
                "policy/length_tokens", "reference/distinct_2"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), key
    assert one["kl"] > 0.0
    rows = [[json.loads(line) for line in (outs[n] / "samples.jsonl").read_text().splitlines()] for n in (1, 2)]
    assert [(r["policy"], r["reference"], r["held_out_prefers"]) for r in rows[0]] == \
        [(r["policy"], r["reference"], r["held_out_prefers"]) for r in rows[1]]
