"""palate: teach agents and language models what people prefer.

One lineage end to end: TRPO -> PPO -> deep RL from human preferences -> fine-tuning language
models from preferences -> InstructGPT. Pure math lives in :mod:`palate.core`; domain layers
(:mod:`palate.rl`, :mod:`palate.preferences`, :mod:`palate.lm`, :mod:`palate.feedback`) build on it.
"""

__version__ = "0.1.0"
