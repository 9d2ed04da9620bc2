"""Pure math on tensors: no I/O, no environments, no models.

Shared by control and language models alike: advantages, PPO losses, trust-region steps,
KL estimators and controllers, and preference losses.
"""
