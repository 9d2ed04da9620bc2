"""Language models: loading, SFT, reward models, PPO with a KL penalty, the InstructGPT pipeline."""
