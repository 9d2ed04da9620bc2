"""SmolLM2-135M's architecture with random weights (seed 0) + the real tokenizer, saved to argv[1].

Runs on the GPU machine, which cannot hold the real 540 MB weights; throughput does not depend on
the weights' values. Reads the config and tokenizer that scripts/gpu/prepare.sh put in .gpu/model.
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(".gpu/model"), Path(sys.argv[1])
cfg = AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("params", sum(p.numel() for p in model.parameters()))
