"""Control: PPO and TRPO on gymnasium environments.

    from palate.rl import PPO, PPOConfig
    model = PPO(PPOConfig(env="CartPole-v1")).learn(total_steps=100_000)
    model.save("runs/cartpole"); model = PPO.load("runs/cartpole"); model.predict(obs)

See docs/rl.md for the configs, the run directory and the hooks used by preference learning
(``reward_fn``, ``rollout_callback``).
"""

from palate.rl.config import OnPolicyConfig, PPOConfig, TRPOConfig
from palate.rl.ppo import PPO
from palate.rl.trpo import TRPO

__all__ = ["PPO", "TRPO", "OnPolicyConfig", "PPOConfig", "TRPOConfig"]
