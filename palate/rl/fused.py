"""Minibatch steps without autograd: flat parameter buffers and hand-derived gradients.

Why: a control policy is two 64x64 MLPs and a minibatch is 64 rows, so every PyTorch op costs
microseconds of dispatch for nanoseconds of arithmetic. With autograd, one clipped-PPO minibatch
(forward, backward, gradient clipping, Adam over ~10 tensors) is well over a hundred ops plus the
graph, 2 to 3 ms in timings on the development machine; PPO's Hopper preset takes 640 of them
per 4,096 environment steps, which is most of a run. This module does the same step in a few dozen ops:

* :class:`FlatParameters` lays every parameter of the actor-critic out in one contiguous buffer
  (the module's parameters become views of it) and every gradient in another. Gradient-norm
  clipping is then two ops and Adam (:func:`adam_step`) seven on one tensor. The layout puts the actor's
  and the critic's hidden layers side by side, so both networks' hidden layers run as one batched
  matmul (``[2, out, in]`` views).
* :class:`FusedClipStep` computes L^CLIP + c1 L^VF - c2 H and its gradient by hand for tanh/relu
  MLPs with a categorical or diagonal-Gaussian head, writing the gradient straight into the flat
  gradient buffer. The numbers are autograd's (tests/test_fused.py compares them to float
  rounding), including ``torch.maximum``'s tie rule inside the clip range.
* :class:`FusedValueStep` does the same for TRPO's critic regression (its own optimiser, on a
  :class:`FlatBuffer` of the critic alone).

Configurations it does not cover (the KL-penalty loss, value clipping) keep the autograd path;
they still get the flat buffer, so clipping and Adam stay cheap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from palate.rl.policies import MLP, ActorCritic

_LOG_2PI = math.log(2.0 * math.pi)


def _activate(z: torch.Tensor, tanh: bool) -> torch.Tensor:
    """The hidden activation, in place."""
    return z.tanh_() if tanh else z.relu_()


def _activation_grad(dh: torch.Tensor, h: torch.Tensor, tanh: bool) -> torch.Tensor:
    """dz from dh (in place) and the activation's output h: tanh' = 1 - h^2, relu' = [h > 0]."""
    return dh.mul_(1.0 - h * h) if tanh else dh.mul_(h > 0)


class FlatBuffer:
    """``params`` as views of one buffer, and their gradients as views of another.

    The parameters stay the same objects (same ``state_dict``), only their storage moves, so
    checkpoints are unchanged and ``load_state_dict`` writes into the buffer.

    Args:
        params: the parameters in the order to lay them out.
        module_order: the same parameters in the order their module lists them (what an
            optimiser state saved over separate tensors refers to); default ``params``.

    Attributes:
        param: the flat buffer as one ``nn.Parameter``, whose ``.grad`` is :attr:`grad` (hand it
            to the optimiser).
        grad: the flat gradient buffer; each parameter's ``.grad`` is a view of it, so autograd's
            backward accumulates into it in place too.
    """

    def __init__(self, params: list[nn.Parameter], module_order: list[nn.Parameter] | None = None) -> None:
        self.module_order = list(module_order if module_order is not None else params)
        if {id(p) for p in params} != {id(p) for p in self.module_order} or len(params) != len(self.module_order):
            raise ValueError("FlatBuffer: the layout and the module order hold different parameters")
        total = sum(p.numel() for p in params)
        self.param = nn.Parameter(torch.empty(total))
        self.grad = torch.zeros(total)
        self.param.grad = self.grad
        self._views: dict[int, tuple[int, int]] = {}  # id(param) -> (offset, numel)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.param[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.param.data[offset:offset + n].view_as(p)
                p.grad = self.grad[offset:offset + n].view_as(p)
                self._views[id(p)] = (offset, n)
                offset += n

    def view(self, buffer: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The slice of ``buffer`` (:attr:`param`'s data or :attr:`grad`) that holds ``p``, shaped like it."""
        offset, n = self._views[id(p)]
        return buffer[offset:offset + n].view_as(p)

    def zero_grad(self) -> None:
        self.grad.zero_()


class FlatParameters(FlatBuffer):
    """Every parameter of an :class:`ActorCritic` in one buffer, laid out for :class:`FusedClipStep`.

    Layout: for each hidden layer, the actor's weight then the critic's (so ``[2, out, in]`` is a
    view), then both biases; then the actor's head, the critic's head, and the log-std.
    """

    def __init__(self, policy: ActorCritic) -> None:
        actor, critic = policy.actor.linears, policy.critic.linears
        order: list[nn.Parameter] = []
        for a, c in zip(actor[:-1], critic[:-1], strict=True):
            order += [a.weight, c.weight, a.bias, c.bias]
        order += [actor[-1].weight, actor[-1].bias, critic[-1].weight, critic[-1].bias]
        if not policy.discrete:
            order.append(policy.log_std)
        super().__init__(order, list(policy.parameters()))
        self.policy = policy

    def _pair(self, buffer: torch.Tensor, first: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        offset, n = self._views[id(first)]
        return buffer[offset:offset + 2 * n].view(2, *shape)

    def hidden_layers(self, buffer: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(W [2, out, in], b [2, out])`` per hidden layer, views of ``buffer`` (param or grad)."""
        return [(self._pair(buffer, a.weight, tuple(a.weight.shape)), self._pair(buffer, a.bias, tuple(a.bias.shape)))
                for a in self.policy.actor.linears[:-1]]


def load_flat_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, flat: FlatBuffer) -> None:
    """Load an optimiser state into the optimiser of ``flat.param``, merging a per-tensor one.

    Checkpoints written before the flat layout hold Adam moments per parameter tensor, in the
    module's order; they are concatenated in the flat layout's order.
    """
    groups = state["param_groups"]
    if len(groups) == 1 and len(groups[0]["params"]) == 1:
        optimizer.load_state_dict(state)
        return
    module_params = flat.module_order
    if len(groups) != 1 or len(groups[0]["params"]) != len(module_params):
        raise ValueError(f"optimiser state has {sum(len(g['params']) for g in groups)} parameter tensors; "
                         f"the policy has {len(module_params)}")
    merged: dict[str, torch.Tensor] = {}
    per_param = [state["state"].get(pid, {}) for pid in groups[0]["params"]]
    if per_param and all(per_param):
        for key in ("exp_avg", "exp_avg_sq"):
            out = torch.zeros_like(flat.grad)
            for p, s in zip(module_params, per_param, strict=True):
                flat.view(out, p).copy_(s[key])
            merged[key] = out
        merged["step"] = per_param[0]["step"].clone()
    new_group = {k: v for k, v in groups[0].items() if k != "params"} | {"params": [0]}
    optimizer.load_state_dict({"state": {0: merged} if merged else {}, "param_groups": [new_group]})


def adam_step(optimizer: torch.optim.Adam, flat: FlatBuffer) -> None:
    """``optimizer.step()`` for the one flat parameter, in seven tensor ops.

    ``torch.optim.Adam.step`` spends ~120 us of Python bookkeeping around a ~15 us kernel; a
    control run takes hundreds of thousands of steps. This is the same update (Adam without
    weight decay or AMSGrad, as PPO and TRPO build it) on the optimiser's own state, so the state dict,
    checkpoints and ``torch.optim`` itself stay interchangeable with it.
    """
    group = optimizer.param_groups[0]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    state = optimizer.state[flat.param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(flat.param)
        state["exp_avg_sq"] = torch.zeros_like(flat.param)
    state["step"] += 1
    step = float(state["step"])
    exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], flat.grad
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2 ** step)).add_(eps)
    flat.param.data.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1 ** step))


class FusedClipStep:
    """The gradient of PPO's clipped loss, by hand, into ``flat.grad``.

    Loss (what :meth:`PPO.update`'s autograd path minimises)::

        L = mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))) + c1 * 0.5 mean((V - R)^2) - c2 mean(H)

    Returns ``(pg_loss, v_loss, entropy, approx_kl, clipfrac)`` as 0-d tensors.
    """

    def __init__(self, flat: FlatParameters) -> None:
        policy = flat.policy
        self.flat = flat
        self.discrete = policy.discrete
        self.tanh = policy.actor.tanh
        actor, critic = policy.actor.linears, policy.critic.linears
        self.hidden = flat.hidden_layers(flat.param.data)
        self.hidden_grad = flat.hidden_layers(flat.grad)
        self.actor_head = (actor[-1].weight.data, actor[-1].bias.data)
        self.critic_head = (critic[-1].weight.data, critic[-1].bias.data)
        self.actor_head_grad = (flat.view(flat.grad, actor[-1].weight), flat.view(flat.grad, actor[-1].bias))
        self.critic_head_grad = (flat.view(flat.grad, critic[-1].weight), flat.view(flat.grad, critic[-1].bias))
        if not self.discrete:
            self.log_std = policy.log_std.data
            self.log_std_grad = flat.view(flat.grad, policy.log_std)

    @staticmethod
    def supports(policy: ActorCritic) -> bool:
        """Tanh/ReLU MLPs with identical hidden sizes for actor and critic (what ActorCritic builds)."""
        actor, critic = policy.actor.linears, policy.critic.linears
        return len(actor) == len(critic) >= 2 and all(
            a.weight.shape == c.weight.shape for a, c in zip(actor[:-1], critic[:-1], strict=True))

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor, actions: torch.Tensor, old_logp: torch.Tensor,
                 advantages: torch.Tensor, returns: torch.Tensor, clip_range: float, vf_coef: float,
                 ent_coef: float) -> tuple[torch.Tensor, ...]:
        n = obs.shape[0]
        # Forward: both networks' hidden layers at once. The first layer shares its input, so it
        # is one matmul with the two weights stacked as [2 * out, in].
        w1, b1 = self.hidden[0]
        h = torch.addmm(b1.reshape(-1), obs, w1.reshape(-1, w1.shape[-1]).t())
        h = _activate(h, self.tanh).view(n, 2, -1).transpose(0, 1)  # [2, n, out]
        hs = [h]
        for w, b in self.hidden[1:]:
            h = _activate(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)), self.tanh)
            hs.append(h)
        out = torch.addmm(self.actor_head[1], h[0], self.actor_head[0].t())
        values = torch.addmm(self.critic_head[1], h[1], self.critic_head[0].t()).squeeze(-1)

        # The policy head's log-probability and entropy, and their pieces for the backward.
        if self.discrete:
            log_p = torch.log_softmax(out, dim=-1)
            idx = actions.long().unsqueeze(-1)
            logp = log_p.gather(-1, idx).squeeze(-1)
            p = log_p.exp()
            entropy_rows = -(p * log_p).sum(-1)
            entropy = entropy_rows.mean()
        else:
            inv_std = torch.exp(-self.log_std)
            z = (actions - out) * inv_std
            z2 = z * z
            logp = -0.5 * z2.sum(-1) - (self.log_std.sum() + 0.5 * _LOG_2PI * z.shape[-1])
            entropy = self.log_std.sum() + 0.5 * (1.0 + _LOG_2PI) * z.shape[-1]

        # L^CLIP. d/drho of max(-A rho, -A clip(rho)) is -A where the unclipped term is the
        # larger or they tie (inside the clip range they are the same number and autograd's
        # half-and-half split of a tie adds back to -A), and 0 where the clipped term wins.
        log_ratio = logp - old_logp
        ratio = log_ratio.exp()
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        pg_loss = torch.maximum(unclipped, clipped).mean()
        dlogp = torch.where(unclipped >= clipped, unclipped, 0.0).div_(n)  # dL/dlogp = dL/drho * rho
        diff = values - returns
        v_loss = 0.5 * (diff * diff).mean()
        dvalue = diff.mul_(vf_coef / n).unsqueeze(-1)

        if self.discrete:
            # d logp_a / d logits = onehot(a) - p; d H / d logits = -p (log p + H).
            dout = p * dlogp.unsqueeze(-1)
            dout.neg_().scatter_add_(-1, idx, dlogp.unsqueeze(-1))
            if ent_coef != 0.0:
                dout.addcmul_(p, log_p + entropy_rows.unsqueeze(-1), value=ent_coef / n)
        else:
            # d logp / d mean = z / std; d logp / d log_std = z^2 - 1 (summed over rows);
            # d H / d log_std = 1 per dimension.
            g = dlogp.unsqueeze(-1)
            dout = (g * z).mul_(inv_std)
            self.log_std_grad.copy_(((z2 - 1.0) * g).sum(0)).sub_(ent_coef)

        # Backward through the heads, then the stacked hidden layers.
        gw, gb = self.actor_head_grad
        torch.mm(dout.t(), hs[-1][0], out=gw)
        torch.sum(dout, 0, out=gb)
        gw, gb = self.critic_head_grad
        torch.mm(dvalue.t(), hs[-1][1], out=gw)
        torch.sum(dvalue, 0, out=gb)
        dh = torch.empty(2, n, hs[-1].shape[-1])
        torch.mm(dout, self.actor_head[0], out=dh[0])
        torch.mm(dvalue, self.critic_head[0], out=dh[1])
        for i in range(len(self.hidden) - 1, -1, -1):
            dz = _activation_grad(dh, hs[i], self.tanh)
            (w, _b), (gw, gb) = self.hidden[i], self.hidden_grad[i]
            below = hs[i - 1] if i > 0 else obs.expand(2, *obs.shape)
            torch.bmm(dz.transpose(1, 2), below, out=gw)
            torch.sum(dz, 1, out=gb)
            if i > 0:
                dh = torch.bmm(dz, w)

        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        return pg_loss, v_loss, entropy, approx_kl, clipfrac


class FusedValueStep:
    """The gradient of TRPO's critic loss 0.5 mean((V(s) - R)^2), by hand, into ``flat.grad``.

    ``flat`` lays out the critic MLP's parameters (any order). Returns the loss as a 0-d tensor.
    """

    def __init__(self, critic: MLP, flat: FlatBuffer) -> None:
        layers = critic.linears
        self.tanh = critic.tanh
        self.layers = [(flat.view(flat.param.data, m.weight), flat.view(flat.param.data, m.bias)) for m in layers]
        self.grads = [(flat.view(flat.grad, m.weight), flat.view(flat.grad, m.bias)) for m in layers]

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        n = obs.shape[0]
        hs = [obs]
        for w, b in self.layers[:-1]:
            h = torch.addmm(b, hs[-1], w.t())
            hs.append(_activate(h, self.tanh))
        w, b = self.layers[-1]
        diff = torch.addmm(b, hs[-1], w.t()).squeeze(-1).sub_(returns)
        loss = 0.5 * (diff * diff).mean()
        d = diff.mul_(1.0 / n).unsqueeze(-1)  # dL/dV
        for i in range(len(self.layers) - 1, -1, -1):
            (w, _b), (gw, gb) = self.layers[i], self.grads[i]
            torch.mm(d.t(), hs[i], out=gw)
            torch.sum(d, 0, out=gb)
            if i > 0:
                d = _activation_grad(torch.mm(d, w), hs[i], self.tanh)
        return loss
