#!/usr/bin/env bash
# The whole POLAR pipeline on CPU with a tiny model (`make demo`):
# tiny model -> check data -> xtuner train (DeepSpeed ZeRO-2) -> convert -> evaluate.
#
# Usage: bash scripts/demo.sh      (with the project's .venv on PATH; `make demo` does that)
# Env:   DEMO_DIR (default work_dirs/demo), MIN_ACCURACY (default 0.90),
#        DEMO_SEED (default 0: the tiny model's weights, the training seed and the
#        packing order), TINY_DIR (default work_dirs/tiny_polar, the untrained model),
#        DEMO_TRAIN (default data/demo/train.jsonl), DEMO_OPTIONS (extra xtuner
#        --cfg-options, space-separated, e.g. "model.center_rewards_coefficient=0.01"),
#        DEMO_CONFIG (default configs/POLAR_tiny_full_varlenattn_demo.py; the LoRA
#        demo, configs/POLAR_tiny_lora_varlenattn_demo.py, runs the same way).
set -euo pipefail
# bit-reproducible MKL results on CPU (see MKL_CBWR in polar_xtuner/constants.py)
export MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-work_dirs/demo}
MIN_ACCURACY=${MIN_ACCURACY:-0.90}
DEMO_SEED=${DEMO_SEED:-0}
TINY_DIR=${TINY_DIR:-work_dirs/tiny_polar}
DEMO_TRAIN=${DEMO_TRAIN:-data/demo/train.jsonl}
DEMO_OPTIONS=${DEMO_OPTIONS:-}
CONFIG=${DEMO_CONFIG:-configs/POLAR_tiny_full_varlenattn_demo.py}
start=$(date +%s)

# A single DeepSpeed process still opens a rendezvous port, and DeepSpeed's MPI
# discovery resets it to 29500 unless all five variables are set: give it a
# free one, so the demo runs beside another training run. A MASTER_PORT you set
# is kept when free; a taken one stops the demo here with one line naming it.
MASTER_PORT=$(python -m polar_xtuner.train.launch --port MASTER_PORT)
export MASTER_PORT MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} RANK=0 WORLD_SIZE=1 LOCAL_RANK=0

echo "== 1/6 tiny POLAR model -> $TINY_DIR (seed $DEMO_SEED)"
mkdir -p "$(dirname "$TINY_DIR")"
python tools/make_tiny_model.py "$TINY_DIR" --seed "$DEMO_SEED" --force  # the same seed writes the same model

echo "== 2/6 check the data"
mkdir -p "$DEMO_DIR"  # the tools never create an output's missing folder (docs/reliability.md)
python tools/build_dataset.py "$DEMO_TRAIN" -o "$DEMO_DIR/data"

echo "== 3/6 evaluate the untrained model"
python tools/eval_pref.py --model "$TINY_DIR" --data data/demo/val.jsonl \
  --out "$DEMO_DIR/eval_untrained.json" --save-scores "$DEMO_DIR/scores_untrained.jsonl"

echo "== 4/6 xtuner train (DeepSpeed ZeRO-2 on CPU)"
rm -rf "$DEMO_DIR/train"
# xtuner's CLI exits 0 even when training fails, so success is judged by the checkpoint.
overrides=(randomness.seed="$DEMO_SEED" train_dataloader.dataset.seed="$DEMO_SEED"
           train_dataloader.dataset.data_files="$DEMO_DIR/data/train.jsonl")
for key in tokenizer model.llm train_dataloader.dataset.tokenizer custom_hooks.0.tokenizer; do
  overrides+=("$key.pretrained_model_name_or_path=$TINY_DIR")
done
read -r -a extra <<< "$DEMO_OPTIONS"
overrides+=("${extra[@]}")
xtuner train "$CONFIG" --deepspeed configs/deepspeed/polar_zero2_cpu.json \
  --work-dir "$DEMO_DIR/train" --cfg-options "${overrides[@]}" > "$DEMO_DIR/train.log" 2>&1 || true
if [ ! -f "$DEMO_DIR/train/last_checkpoint" ]; then
  tail -n 30 "$DEMO_DIR/train.log" >&2
  echo "error: training did not finish; full log: $DEMO_DIR/train.log" >&2
  exit 1
fi
grep -E "Iter\(train\) \[ *[0-9]+/" "$DEMO_DIR/train.log" | sed -n '1p;$p' | cut -c1-160

echo "== 5/6 convert to a Hugging Face model -> $DEMO_DIR/hf"
# The config as trained (with the overrides above), as xtuner saved it in the work dir.
bash tools/convert.sh "$DEMO_DIR/train/$(basename "$CONFIG")" "$DEMO_DIR/train" "$DEMO_DIR/hf" --force

echo "== 6/6 evaluate the trained model"
python tools/eval_pref.py --model "$DEMO_DIR/hf" --data data/demo/val.jsonl \
  --out "$DEMO_DIR/eval.json" --save-scores "$DEMO_DIR/scores.jsonl" \
  --compare "$DEMO_DIR/scores_untrained.jsonl"  # the same pairs, before and after: the gain with its interval

python - "$DEMO_DIR" "$MIN_ACCURACY" "$start" <<'PY'
import json, sys, time
d, target, start = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
before = json.load(open(f"{d}/eval_untrained.json"))["accuracy"]
report = json.load(open(f"{d}/eval.json"))
after, gain = report["accuracy"], report["compare"]["difference"]["accuracy"]
lo, hi = gain["ci95"]
print(f"\nheld-out accuracy: untrained {before:.3f} -> trained {after:.3f}, a gain of {gain['difference']:+.3f} "
      f"(paired 95% CI {lo:+.3f} to {hi:+.3f}; target {target:.2f}); demo took {time.time() - start:.0f} s")
if after < target:
    sys.exit(f"error: the trained model did not reach {target:.2f}")
PY
