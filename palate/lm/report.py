"""The pipeline report: ``report.md`` plus PNG plots, built only from what the stages wrote.

Plots: gold (held-out labeller) and proxy (reward model) scores against KL for best-of-N and
PPO (Gao et al. 2022's overoptimisation picture), reward and KL over PPO iterations, the
reward-vs-KL frontier (Ziegler et al. figure 2's axes: what a policy gained for how far it moved
from the reference), and the held-out labeller's verdicts. A table shows the same prompts answered before (SFT) and after (PPO).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from palate.lm.config import PIPELINE_STAGES
from palate.runs import atomic_write_text, read_jsonl_records

log = logging.getLogger(__name__)


def _kl_budget_note(stopped: dict[str, Any] | None) -> str:
    """Where a PPO run stopped at its KL budget, said in the stage table (empty if it ran through)."""
    if not stopped or stopped.get("reason") != "kl_budget":
        return ""
    return (f"; stopped at its KL budget before iteration {stopped['iteration'] + 1}'s update (mean KL of the "
            f"last 2 batches {_fmt(stopped.get('mean_kl_last_2'))} > {_fmt(stopped.get('kl_budget'))} nats)"
            + (f"; the policy kept is the one after iteration {stopped['policy_iteration']} (its batch: KL "
               f"{_fmt(stopped.get('policy_kl'), 2)})" if "policy_iteration" in stopped else ""))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return "n/a" if x is None else str(x)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_training(metrics: list[dict[str, Any]], out: Path) -> Path | None:
    """Reward and KL (with beta) over PPO iterations."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [m.get("objective/reward") for m in metrics], marker="o", ms=3)
    ax1.set_xlabel("PPO iteration")
    ax1.set_ylabel("score of sampled completions")
    ax1.set_title("reward")
    ax2.plot(steps, [m.get("objective/kl") for m in metrics], marker="o", ms=3, color="C1", label="KL(pi || rho)")
    ax2.set_xlabel("PPO iteration")
    ax2.set_ylabel("nats per completion")
    ax2.set_title("KL to the SFT reference")
    twin = ax2.twinx()
    twin.plot(steps, [m.get("objective/kl_coef") for m in metrics], color="C2", ls="--", label="beta")
    twin.set_ylabel("beta (kl_coef)")
    ax2.legend(loc="upper left")
    twin.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_frontier(metrics: list[dict[str, Any]], evaluation: dict[str, Any], out: Path,
                  reward_key: str = "reward") -> Path | None:
    """Reward against KL: each training iteration, and the evaluated SFT and PPO policies.

    ``reward_key`` picks the evaluation number that is the training reward (``rm_score`` when PPO
    maximised the reward model, ``reward`` for the task's function), so all points share an axis.
    """
    if not metrics and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    if metrics:
        sc = ax.scatter([m.get("objective/kl") for m in metrics], [m.get("objective/reward") for m in metrics],
                        c=[m["step"] for m in metrics], cmap="viridis", s=18, label="training batches")
        fig.colorbar(sc, ax=ax, label="iteration")
    if evaluation:
        ax.scatter([0.0], [evaluation[f"{reward_key}_reference"]], marker="s", s=60, color="black", label="SFT (test)")
        ax.scatter([evaluation["kl"]], [evaluation[reward_key]], marker="*", s=140, color="red", label="PPO (test)")
    ax.set_xlabel("KL(pi || SFT), nats per completion")
    ax.set_ylabel("reward")
    ax.set_title("reward vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_win_rate(samples: list[dict[str, Any]], out: Path) -> Path | None:
    """The held-out labeller's verdicts: PPO preferred, tie, SFT preferred."""
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["policy", "tie", "reference"]
    counts = [sum(s["held_out_prefers"] == k for s in samples) for k in labels]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(["PPO preferred", "tie", "SFT preferred"], counts, color=["C2", "C7", "C3"])
    ax.set_ylabel("comparisons")
    ax.set_title(f"held-out labeller, {len(samples)} test comparisons")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ppo_points(ppo_samples: list[dict[str, Any]], judge: Any) -> list[dict[str, float]]:
    """Per PPO iteration: mean KL, RM score and held-out utility of the logged rollout samples."""
    by_iter: dict[int, list[dict[str, Any]]] = {}
    for s in ppo_samples:
        if "kl" in s:
            by_iter.setdefault(int(s["iteration"]), []).append(s)
    points = []
    for it in sorted(by_iter):
        rows = by_iter[it]
        points.append({"iteration": it, "kl": float(np.mean([r["kl"] for r in rows])),
                       "proxy": float(np.mean([r["score"] for r in rows])),
                       "gold": float(np.mean([judge.score(r["prompt"], r["completion"]) for r in rows]))})
    return points


def expected_win_rate(samples: list[dict[str, Any]], judge: Any) -> float:
    """The held-out labeller's *expected* win rate of the policy over SFT on the eval pairs: its choice
    is its utility plus Gumbel noise, so ``P(win) = sigmoid(du / temperature)`` (identical texts tie).
    The same estimator as best-of-N's, so the two compare without sampling noise."""
    from palate.lm.best_of_n import expected_win_against_pool

    wins = [expected_win_against_pool(np.array([judge.score(s["prompt"], s["policy"]),
                                                judge.score(s["prompt"], s["reference"])]),
                                      [s["policy"], s["reference"]], judge.temperature)[0] for s in samples]
    return float(np.mean(wins)) if wins else float("nan")


def plot_overoptimisation(bon: dict[str, Any], points: list[dict[str, float]], evaluation: dict[str, Any],
                          out: Path) -> Path | None:
    """Gold (held-out utility) and proxy (RM score) against KL to SFT: best-of-N and PPO (Gao et al. 2022)."""
    curve = bon.get("curve") or []
    if not curve and not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, ev_key, title in ((axes[0], "gold", "judge_score", "gold: held-out labeller's utility"),
                                   (axes[1], "proxy", "rm_score", "proxy: reward model score")):
        if curve:
            ax.plot([c["kl"] for c in curve], [c[key] for c in curve], marker="o", ms=4, color="C0",
                    label=f"best-of-N, N = 1..{int(curve[-1]['n'])} (test prompts)")
            for c in curve:
                ax.annotate(str(int(c["n"])), (c["kl"], c[key]), fontsize=7, xytext=(2, 3), textcoords="offset points")
        if points:
            ax.scatter([p["kl"] for p in points], [p[key] for p in points], c=[p["iteration"] for p in points],
                       cmap="Oranges", vmin=-len(points) / 2, s=22, edgecolors="C1",
                       label="PPO rollouts, one point per iteration (train prompts; darker = later)")
        if evaluation.get(ev_key) is not None:
            ax.scatter([evaluation["kl"]], [evaluation[ev_key]], marker="*", s=140, color="red", zorder=3,
                       label="PPO policy (test prompts)")
        ax.set_xlabel("KL to SFT, nats per completion")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _human_rows(human: dict[str, Any] | None) -> list[str]:
    """The headline row of people's verdicts (``palate lm eval --judge human``), if any."""
    if not human:
        return []
    judges = ", ".join(f"{name} {n}" for name, n in human["judges"].items()) or "nobody yet"
    state = "" if human["complete"] else f"; {human['pairs_open']} of {human['n_pairs']} pairs still open"
    return [f"| win rate vs SFT, people ({human['n_answers']} answers: {human['wins']} for PPO, "
            f"{human['losses']} for SFT, {human['ties']} ties, {human['cant_tell']} can't tell; judges: {judges}"
            f"{state}) | {_fmt(human['win_rate'])} ± {_fmt(human['win_rate_stderr'])} | 0.5 |"]


def write_report(root: str | Path, n_samples: int = 6) -> Path:
    """Write ``<root>/report.md`` and its PNGs from the stage directories under ``root``."""
    from palate.lm.ppo import read_metrics

    root = Path(root)
    metrics = read_metrics(root / "ppo")
    online = read_metrics(root / "ppo", phase="online")
    evaluation = _json(root / "eval" / "summary.json")
    samples = read_jsonl_records(root / "eval" / "samples.jsonl")
    timings = _json(root / "timings.json")
    sft, rm, ppo = _json(root / "sft" / "summary.json"), _json(root / "rm" / "summary.json"), _json(root / "ppo" / "summary.json")
    pipeline = _json(root / "pipeline.json")
    bon = _json(root / "bon" / "summary.json")
    dpo_eval = _json(root / "dpo_eval" / "summary.json")
    dpo_samples = read_jsonl_records(root / "dpo_eval" / "samples.jsonl")
    judge = None
    if pipeline.get("task"):
        from palate.data.tasks import load_task

        judge = load_task(pipeline["task"]).panel.held_out
    points = _ppo_points(read_jsonl_records(root / "ppo" / "samples.jsonl"), judge) if judge is not None else []

    plots = {
        "training": plot_training(metrics, root / "reward_kl.png"),
        "frontier": plot_frontier(metrics, evaluation, root / "frontier.png",
                                  "rm_score" if pipeline.get("ppo_reward") == "rm" and "rm_score" in evaluation else "reward"),
        "win_rate": plot_win_rate(samples, root / "win_rate.png"),
        "overoptimisation": plot_overoptimisation(bon, points, evaluation, root / "overoptimisation.png"),
    }
    lines = [f"# palate pipeline report: {root.name}", ""]
    if pipeline:
        if pipeline.get("ppo_reward") == "rm":
            what = "the reward model learned from the labellers' comparisons"
        else:
            what = ("the task's own scoring function: an **oracle-reward upper bound**, not a result of "
                    "learning from preferences")
        lines += [f"Task `{pipeline.get('task')}`, base model `{pipeline.get('base_model')}`, PPO maximises {what}.", ""]
    if evaluation:
        lines += [
            "## Headline",
            "",
            "| metric | PPO policy | SFT reference |",
            "|---|---|---|",
            f"| win rate vs SFT, held-out labeller ({evaluation.get('n_comparisons')} comparisons) | "
            f"{_fmt(evaluation.get('win_rate'))} ± {_fmt(evaluation.get('win_rate_stderr'))} | 0.5 |",
            f"| task reward (mean) | {_fmt(evaluation.get('reward'))} | {_fmt(evaluation.get('reward_reference'))} |",
        ]
        lines += _human_rows(evaluation.get("human"))
        if rm.get("rm/held_out_accuracy") is not None:
            lines.append(f"| reward model's accuracy on the held-out labeller's validation pairs | "
                         f"{_fmt(rm['rm/held_out_accuracy'])} | |")
        if "rm_score" in evaluation:
            lines.append(f"| reward model score (mean) | {_fmt(evaluation['rm_score'])} | {_fmt(evaluation.get('rm_score_reference'))} |")
        lines += [
            f"| held-out labeller utility (mean) | {_fmt(evaluation.get('judge_score'))} | {_fmt(evaluation.get('judge_score_reference'))} |",
            f"| KL to SFT (nats per completion) | {_fmt(evaluation.get('kl'), 2)} ± {_fmt(evaluation.get('kl_stderr'), 2)} | 0 |",
            f"| perplexity on held-out Python docs (alignment tax) | {_fmt(evaluation.get('perplexity'), 2)} | {_fmt(evaluation.get('perplexity_reference'), 2)} |",
            f"| mean length (tokens) | {_fmt(evaluation.get('policy/length_tokens'), 1)} | {_fmt(evaluation.get('reference/length_tokens'), 1)} |",
            f"| distinct-2 | {_fmt(evaluation.get('policy/distinct_2'))} | {_fmt(evaluation.get('reference/distinct_2'))} |",
            f"| repeated 3-grams | {_fmt(evaluation.get('policy/repetition_3gram'))} | {_fmt(evaluation.get('reference/repetition_3gram'))} |",
            "",
        ]
    if bon.get("curve") or (evaluation and judge is not None) or dpo_eval:
        lines += ["## PPO against best-of-N and DPO" if dpo_eval else "## PPO against best-of-N", "",
                  "Win rates here are the held-out labeller's *expected* ones (its utility difference through "
                  "its noise model), one estimator for both rows; the headline's is its sampled verdicts.", "",
                  "| method | KL to SFT (nats) | expected win rate vs SFT | held-out utility | RM score |",
                  "|---|---|---|---|---|"]
        if evaluation and judge is not None:
            lines.append(f"| PPO on the reward model | {_fmt(evaluation.get('kl'), 2)} | "
                         f"{_fmt(expected_win_rate(samples, judge))} | {_fmt(evaluation.get('judge_score'))} | "
                         f"{_fmt(evaluation.get('rm_score'))} |")
        for c in bon.get("curve", [])[1:]:
            lines.append(f"| best-of-{int(c['n'])} with the reward model | {_fmt(c['kl'], 2)} | {_fmt(c['win_rate'])} | "
                         f"{_fmt(c['gold'])} | {_fmt(c['proxy'])} |")
        if dpo_eval:
            expected = expected_win_rate(dpo_samples, judge) if judge is not None and dpo_samples else None
            lines.append(f"| DPO on the same rankings | {_fmt(dpo_eval.get('kl'), 2)} | {_fmt(expected)} | "
                         f"{_fmt(dpo_eval.get('judge_score'))} | {_fmt(dpo_eval.get('rm_score'))} |")
        if bon.get("curve") and evaluation.get("kl"):
            n_match = float(np.exp(evaluation["kl"] + 1.0))
            lines += ["", f"Best-of-N reaches PPO's KL of {_fmt(evaluation['kl'], 1)} nats only at N ≈ {n_match:,.0f} "
                      "samples per prompt (KL = log N - (N - 1) / N)."]
        if dpo_eval:
            lines += ["", f"DPO's sampled win rate vs SFT by the held-out labeller: {_fmt(dpo_eval.get('win_rate'))} ± "
                      f"{_fmt(dpo_eval.get('win_rate_stderr'))} over {dpo_eval.get('n_comparisons')} comparisons "
                      f"(PPO's: {_fmt(evaluation.get('win_rate'))} ± {_fmt(evaluation.get('win_rate_stderr'))})."]
        lines.append("")
    lines += ["## Stages", "", "| stage | wall time (s) | notes |", "|---|---|---|"]
    notes = {
        "sft": f"{sft.get('train_examples')} demonstrations, val loss {_fmt(sft.get('sft/val_loss'))}" if sft else "",
        "rm": f"val accuracy {_fmt(rm.get('rm/val_accuracy'))}, held-out labeller accuracy {_fmt(rm.get('rm/held_out_accuracy'))}" if rm else "",
        "ppo": (f"{ppo.get('iterations')} iterations, {sum(m.get('time/rollout_s', 0) + m.get('time/update_s', 0) for m in metrics):.0f} s "
                f"of rollout + update (all sessions, if resumed), final beta {_fmt(ppo.get('kl_coef'), 4)}"
                + _kl_budget_note(ppo.get("stopped"))) if ppo else "",
        "eval": f"{evaluation.get('n_comparisons')} comparisons on the {evaluation.get('split')} split" if evaluation else "",
        "dpo_eval": f"{dpo_eval.get('n_comparisons')} comparisons on the {dpo_eval.get('split')} split" if dpo_eval else "",
    }
    for stage in sorted(timings, key=lambda st: PIPELINE_STAGES.index(st) if st in PIPELINE_STAGES else 99):
        lines.append(f"| {stage} | {timings[stage]} | {notes.get(stage, '')} |")
    if timings:
        lines.append(f"| **total** | {round(sum(timings.values()), 1)} | |")
    lines.append("")
    if online:
        lines += ["## Online collection", "", "| before iteration | new labels | RM accuracy on them |", "|---|---|---|"]
        lines += [f"| {m['step']} | {m.get('online/labels')} | {_fmt(m.get('online/rm_accuracy'))} |" for m in online]
        lines.append("")
    from palate.lm.human_label import people_report_lines

    lines += people_report_lines({"label stage": root / "label" / "comparisons.jsonl",
                                  "online collection (PPO)": root / "ppo" / "online_human.jsonl"})
    lines += ["## Plots", ""]
    for title, key in (("Overoptimisation: gold and proxy scores against KL", "overoptimisation"),
                       ("Reward and KL during PPO", "training"), ("Reward vs KL", "frontier"),
                       ("Held-out labeller verdicts", "win_rate")):
        if plots[key] is not None:
            lines += [f"### {title}", "", f"![{title}]({plots[key].name})", ""]
    if samples:
        lines += ["## Samples: the same test prompts before (SFT) and after (PPO)", "",
                  "| prompt | SFT | PPO | held-out labeller prefers |", "|---|---|---|---|"]
        seen: set[str] = set()
        for s in samples:
            if s["prompt"] in seen:
                continue
            seen.add(s["prompt"])
            lines.append(f"| {_cell(s['prompt'], 80)} | {_cell(s['reference'])} | {_cell(s['policy'])} | {s['held_out_prefers']} |")
            if len(seen) >= n_samples:
                break
        lines.append("")
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    log.info("report written to %s", path)
    return path
