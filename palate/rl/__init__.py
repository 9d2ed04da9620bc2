"""Control: PPO and TRPO on gymnasium environments.

    from palate.rl import PPO, PPOConfig
    model = PPO(PPOConfig(env="CartPole-v1")).learn(total_steps=100_000)
    model.save("runs/cartpole"); model = PPO.load("runs/cartpole"); model.predict(obs)

See docs/rl.md for the configs, the run directory and the hooks used by preference learning
(``reward_fn``, ``rollout_callback``).
"""

from typing import TYPE_CHECKING, Any

from palate.rl.config import OnPolicyConfig, PPOConfig, TRPOConfig

if TYPE_CHECKING:
    from palate.rl.ppo import PPO
    from palate.rl.trpo import TRPO


def __getattr__(name: str) -> Any:
    # The trainers import torch (~2.5 s); loading them on first use keeps `palate --help` instant.
    if name == "PPO":
        from palate.rl.ppo import PPO

        return PPO
    if name == "TRPO":
        from palate.rl.trpo import TRPO

        return TRPO
    raise AttributeError(f"module 'palate.rl' has no attribute {name!r}")


__all__ = ["PPO", "TRPO", "OnPolicyConfig", "PPOConfig", "TRPOConfig"]
