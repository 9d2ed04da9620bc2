# Build .gpu/ (git-ignored) for scripts/gpu/run.sh on a lent GPU machine, which has PyTorch but no
# network: wheels palate and TRL need beyond that machine's image, SmolLM2-135M's config and
# tokenizer (not its weights: random ones are made there), and the lm-sft-rm benchmark's data.
# Usage: bash scripts/gpu/prepare.sh DATA_DIR   (DATA_DIR: a `python -m palate.bench lm-sft-rm` work dir)
set -e
cd "$(dirname "$0")/../.."
data=${1:?usage: prepare.sh DATA_DIR (the work/ dir of a lm-sft-rm benchmark run)}
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
mkdir -p .gpu/whl .gpu/model .gpu/data
for p in transformers==5.24.0 tokenizers==0.23.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 \
         vaderSentiment==3.3.2 peft==0.21.2 fsspec==2026.9.0 regex==2026.11.19; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "$p"
done
model=$(.venv/bin/python -c "from palate.lm.models import resolve_model_path; print(resolve_model_path('smollm2-135m-instruct'))")
cp "$model"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/model/
cp "$data"/{demos,train,val,train_pairs,val_pairs}.jsonl "$data"/data.json .gpu/data/
du -sh .gpu
