"""Online data collection (Ziegler et al. 2019, section 2.2): keep the reward model on-distribution.

A reward model trained on samples of the SFT model is asked, during PPO, to score samples of a
policy that keeps drifting away from them; Ziegler et al. therefore collect new comparisons
from the *current* policy as training goes and retrain the reward model on all labels so far.
Every ``online_every`` PPO iterations :class:`OnlineCollector` samples K completions for some
training prompts from the current policy, has them ranked, measures the current reward model's
pairwise accuracy on these *new* rankings (an honest check of how far off-distribution it has
drifted), appends them to the comparison set and fine-tunes the reward model on all of it.

The labeller is pluggable: anything with ``compare(prompt, completions, rng) -> ranks`` answers on
the spot (the synthetic panel's training labellers, never the held-out one). People answer
minutes later: an *asynchronous* labeller (``asynchronous = True``, with ``ask(iteration, prompts,
groups)`` and ``arrived()``, e.g. :class:`palate.lm.human_label.PeopleRanking`) gets the round's
comparisons posted as tasks, PPO goes on, and each round retrains the reward model on whatever
answers have arrived since the last one (from any earlier round). The accuracy check then
measures the current reward model on those answers, whose completions came from an older policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from palate.lm.generation import decode_responses, sample
from palate.lm.training import adamw

log = logging.getLogger(__name__)


class RankingLabeller(Protocol):
    """Who answers online queries: ranks of ``completions`` (0 = best, equal ranks tie)."""

    name: str

    def compare(self, prompt: str, completions: Sequence[str], rng: np.random.Generator) -> list[int]: ...


class RoundRobinPanel:
    """The task panel's *training* labellers in turn, one per query (like InstructGPT's contractors).

    The held-out labeller is excluded by construction: it judges the final evaluation only.
    """

    def __init__(self, panel: Any) -> None:
        self.labellers = list(panel.train_labellers)
        if not self.labellers:
            raise ValueError("the panel has no training labellers")
        self.name = "panel:" + ",".join(lab.name for lab in self.labellers)
        self._next = 0
        self.last_name = ""

    def compare(self, prompt: str, completions: Sequence[str], rng: np.random.Generator) -> list[int]:
        lab = self.labellers[self._next % len(self.labellers)]
        self._next += 1
        self.last_name = lab.name
        return lab.compare(prompt, completions, rng)


def pairwise_accuracy(scores: torch.Tensor, ranks: Sequence[int]) -> tuple[int, int]:
    """``(correct, pairs)``: ranked pairs (ties skipped) that the scores order the same way."""
    correct = pairs = 0
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] == ranks[j]:
                continue
            pairs += 1
            correct += int((scores[i] > scores[j]) == (ranks[i] < ranks[j]))
    return correct, pairs


class OnlineCollector:
    """Collects comparisons from the current policy and retrains the reward model in place.

    Args:
        reward_model: a :class:`palate.lm.reward_model.RewardModel`; updated in place, so the PPO
            trainer's scorer sees the retrained model from the next rollout on.
        tokenizer: the policy's (and reward model's) tokenizer.
        labeller: a :class:`RankingLabeller`.
        comparisons: the comparison set so far (e.g. the pipeline's label stage); grows.
        k: completions per prompt.
        n_prompts: prompts per round.
        rm_epochs: passes over all comparisons after each round.
        learning_rate: AdamW learning rate of the reward-model update.
        batch_size: comparisons per reward-model step.
        chat, max_length: how (prompt, completion) is encoded for the reward model.
        seed: prompt choice and labelling noise.
    """

    def __init__(self, reward_model: torch.nn.Module, tokenizer, labeller: RankingLabeller,
                 comparisons: list[Any] | None = None, *, k: int = 4, n_prompts: int = 8, rm_epochs: int = 1,
                 learning_rate: float = 1e-5, batch_size: int = 8, chat: bool = False, max_length: int = 256,
                 seed: int = 0) -> None:
        self.rm = reward_model
        self.tokenizer = tokenizer
        self.labeller = labeller
        self.comparisons: list[Any] = list(comparisons or [])
        self.k, self.n_prompts, self.rm_epochs = k, n_prompts, rm_epochs
        self.batch_size, self.chat, self.max_length = batch_size, chat, max_length
        self.rng = np.random.default_rng(seed)
        self.rounds = 0
        # A frozen-feature RM (palate.lm.reward_features) refits its heads on cached features; any
        # other RM is fine-tuned with AdamW.
        self.features = None
        self.optimizer = None
        if getattr(self.rm, "frozen_features", False):
            from palate.lm.reward_features import FeatureCache

            source = getattr(self.rm, "source_dir", None)
            self.features = FeatureCache.load(source) if source is not None else FeatureCache()
            return
        params = [p for p in self.rm.parameters() if p.requires_grad] or list(self.rm.parameters())
        for p in params:
            p.requires_grad_(True)
        self.optimizer = adamw(params, lr=learning_rate)

    @classmethod
    def from_config(cls, cfg: Any, reward_model: torch.nn.Module, tokenizer, task: Any,
                    comparisons_path: str | None = None) -> OnlineCollector:
        """The collector of an :class:`LMPPOConfig`: the task panel's training labellers, or people."""
        comps = []
        if comparisons_path:
            from palate.data.formats import read_comparisons

            comps = read_comparisons(comparisons_path)
        chat = task.chat if cfg.chat is None else cfg.chat
        labeller: Any = RoundRobinPanel(task.panel)
        if getattr(cfg, "online_labeller", "synthetic") == "human":
            from palate.lm.human_label import PeopleRanking, feedback_client

            labeller = PeopleRanking(feedback_client(cfg.feedback_url, cfg.feedback_token_env),
                                     cfg.feedback_project or cfg.run_name, cfg.run_dir, run=cfg.run_name,
                                     redundancy=cfg.online_redundancy)
        return cls(reward_model, tokenizer, labeller, comps, k=cfg.online_k,
                   n_prompts=cfg.online_prompts, rm_epochs=cfg.online_rm_epochs,
                   learning_rate=cfg.online_rm_learning_rate, chat=chat,
                   max_length=getattr(reward_model, "max_length", 256), seed=cfg.seed + 7)

    # -- one round ---------------------------------------------------------------------------

    def collect(self, trainer: Any, iteration: int) -> dict[str, float]:
        """Sample, label, check, append, retrain; returns ``online/*`` metrics."""
        from palate.data.formats import Comparison

        t0 = time.perf_counter()
        n = min(self.n_prompts, len(trainer.prompts))
        chosen = self.rng.choice(len(trainer.prompts), size=n, replace=False).tolist()
        prompts = [trainer.prompts[i] for i in chosen]
        ids = [trainer.prompt_ids[i] for i in chosen for _ in range(self.k)]
        batch = sample(trainer.unwrapped.policy, trainer.tokenizer, ids, trainer.max_new_tokens,
                       trainer.cfg.temperature, batch_size=trainer.cfg.forward_batch_size)
        texts = decode_responses(trainer.tokenizer, batch)
        groups = [texts[j * self.k:(j + 1) * self.k] for j in range(len(prompts))]
        extra: dict[str, float] = {}
        if getattr(self.labeller, "asynchronous", False):
            # People: post this round's comparisons, learn from whatever answers have come in.
            extra["online/asked"] = float(self.labeller.ask(iteration, prompts, groups))
            arrived = self.labeller.arrived()
            extra["online/pending"] = float(self.labeller.pending)
        else:
            arrived = []
            for prompt, cands in zip(prompts, groups):
                ranks = list(self.labeller.compare(prompt, cands, self.rng))
                if len(set(ranks)) < 2:
                    continue  # all tied: nothing to learn
                arrived.append(Comparison(prompt, list(cands), ranks, "ranking",
                                          labeller=getattr(self.labeller, "last_name", "")
                                          or getattr(self.labeller, "name", ""), source=f"online:{iteration}"))
        correct = pairs = 0
        for comp in arrived:
            with torch.no_grad():
                scores = self.rm.score_texts([comp.prompt] * len(comp.completions), comp.completions, self.tokenizer,
                                             batch_size=len(comp.completions))
            c, p = pairwise_accuracy(scores, comp.ranks)
            correct, pairs = correct + c, pairs + p
        new = arrived
        self.comparisons.extend(new)
        loss = self.retrain() if new else float("nan")
        self.rounds += 1
        metrics = {"online/labels": float(len(new)), "online/comparisons_total": float(len(self.comparisons)),
                   "online/rm_accuracy": correct / pairs if pairs else float("nan"),
                   "online/rm_loss": loss, "online/seconds": time.perf_counter() - t0, **extra}
        log.info("online round %d before iteration %d: %d new comparisons, RM accuracy on them %.3f",
                 self.rounds, iteration, len(new), metrics["online/rm_accuracy"])
        return metrics

    def retrain(self) -> float:
        """Retrain on all comparisons so far; returns the mean training loss.

        A frozen-feature RM refits its heads (the new texts' features are computed once and
        cached); otherwise ``rm_epochs`` passes of the ranking loss fine-tune the RM.
        """
        if self.features is not None:
            from palate.lm.reward_features import refit

            self.features.ensure(self.rm, self.tokenizer, [(c.prompt, y) for c in self.comparisons
                                                           for y in c.completions])
            return refit(self.rm, self.features, self.comparisons)["loss"]
        from palate.lm.reward import _comparison_tensors, collate_comparisons, comparison_loss

        items = _comparison_tensors(self.comparisons, self.tokenizer, self.chat, self.max_length)["items"]
        was_training = self.rm.training
        self.rm.train()
        losses = []
        device = next(self.rm.parameters()).device
        try:
            for _ in range(self.rm_epochs):
                order = self.rng.permutation(len(items)).tolist()
                for start in range(0, len(order), self.batch_size):
                    chunk = [items[i] for i in order[start:start + self.batch_size]]
                    batch = collate_comparisons(chunk, self.tokenizer.pad_token_id)
                    b, k = batch["valid"].shape
                    batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
                    raw = self.rm.raw_scores(batch["input_ids"], batch["attention_mask"]).float().view(b, k)
                    out = comparison_loss(raw, batch)
                    if float(out["n"]) == 0:
                        continue
                    loss = out["loss_sum"] / out["n"]
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.rm.parameters(), 1.0)
                    self.optimizer.step()
                    losses.append(float(loss.detach()))
        finally:
            self.rm.train(was_training)
            self.rm.eval()
        return float(np.mean(losses)) if losses else float("nan")

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the RM weights, its optimiser, the labels, the RNG."""
        # A frozen-feature RM changes only its heads and normalisation: the backbone is not saved.
        rm_state = {k: v.detach().cpu().clone() for k, v in self.rm.state_dict().items()
                    if self.features is None or not k.startswith("backbone.")}
        return {"rm": rm_state, "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "features": self.features.state() if self.features is not None else None,
                "rng": self.rng.bit_generator.state,
                "comparisons": [c.to_json() | {"_kind": c.kind, "_ranks": c.ranks} for c in self.comparisons],
                "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from palate.data.formats import Comparison

        if self.features is not None:
            from palate.lm.reward_features import FeatureCache

            self.rm.load_state_dict(state["rm"], strict=False)
            if state.get("features") is not None:
                self.features = FeatureCache.from_state(state["features"])
        else:
            self.rm.load_state_dict(state["rm"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.rounds = int(state["rounds"])
        self.comparisons = []
        fields = {"prompt", "chosen", "rejected", "completions", "ranking", "best", "labeller", "_kind", "_ranks"}
        for rec in state["comparisons"]:
            kind, ranks = rec["_kind"], rec["_ranks"]
            if kind == "pair":
                comps = [rec["chosen"], rec["rejected"]]
            else:
                comps = list(rec["completions"])
            self.comparisons.append(Comparison(rec["prompt"], comps, list(ranks), kind, best=rec.get("best"),
                                               labeller=rec.get("labeller"),
                                               meta={k: v for k, v in rec.items() if k not in fields}))
        if hasattr(self.labeller, "delivered"):
            # People's answers read after this checkpoint are in the labeller's JSONL: hand them out again.
            self.labeller.delivered = {int(c.meta["answer_id"]) for c in self.comparisons if "answer_id" in c.meta}
