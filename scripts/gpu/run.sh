# One call on a lent GPU machine (device tool, carry [".gpu"]; build .gpu with prepare.sh first):
# the CUDA tests, SFT/RM vs TRL at batch 8 and 32, and LM PPO timing. Results land in $OUT.
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, trl, datasets, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" || exit 1
python3 scripts/gpu/make_model.py /tmp/smol || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/lm/test_gpu.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -5 $OUT/pytest.log
# batch:epochs (batch 8 is the CPU benchmark's batch; at 10 epochs it outran the 240 s limit)
for be in ${RUNS:-8:3 32:10}; do
  b=${be%:*} e=${be#*:}
  mkdir -p /tmp/b$b/work && cp .gpu/data/* /tmp/b$b/work/
  timeout 240 python3 -m palate.bench.lm_sft_rm --device cuda --model /tmp/smol --epochs $e --batch-size $b \
      --trl-path /tmp/site --out /tmp/b$b > $OUT/bench-b$b.log 2>&1; echo "bench b$b rc=$?"
  cp /tmp/b$b/results.json $OUT/results-b$b.json 2>/dev/null; tail -8 $OUT/bench-b$b.log
done
timeout 120 python3 scripts/gpu/ppo_gpu.py /tmp/smol 64 > $OUT/ppo.log 2>&1; echo "ppo rc=$?"; tail -3 $OUT/ppo.log
