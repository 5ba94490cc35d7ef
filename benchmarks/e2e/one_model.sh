#!/usr/bin/env bash
# End to end on one model, the way a user with trained weights goes:
# random weights saved to .safetensors -> dynopool convert --weights (placement exact) ->
# dynopool finetune 3 steps under 0.8x the original's FLOPs on Fashion-MNIST, validated on 500 images -> dynopool report ->
# dynopool export --format onnx (checked in onnxruntime). One line: OK or FAIL <stage>: <last line>.
#
#   benchmarks/e2e/one_model.sh timm:regnety_002 64 [/usr/share/datasets/fashion-mnist] [OUT_ROOT]
#   FT_ARGS="--scale-lr 0.01" benchmarks/e2e/one_model.sh timm:regnety_002 64x96   # extra finetune flags
#
# Used for the sweeps over models the issues do not name (closing notes of sessions 7 and 8).
set -uo pipefail
model=$1; px=$2; data=${3:-/usr/share/datasets/fashion-mnist}; root=${4:-/tmp/e2e}
d=$root/$(echo "$model" | tr ':/' '__'); rm -rf "$d"; mkdir -p "$d"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python - "$model" "$d/w.safetensors" <<'PY' || { echo "FAIL weights"; exit 1; }
import sys
from safetensors.torch import save_file
import dynopool_convert as dc
m = dc.build_model(sys.argv[1], {})
save_file({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, sys.argv[2])  # clones: tied tensors (CoaT) are refused shared
PY
dynopool convert "$model" --weights "$d/w.safetensors" --input-size "$px" --out "$d/c.pt" > "$d/convert.log" 2>&1 \
    || { echo "FAIL convert: $(tail -1 "$d/convert.log")"; exit 1; }
dynopool finetune "$d/c.pt" --budget 0.8x --data "fashion-mnist:$data" --steps 3 --batch-size 8 --val-limit 500 ${FT_ARGS:-} --out "$d/run" > "$d/ft.log" 2>&1 \
    || { echo "FAIL finetune: $(tail -1 "$d/ft.log")"; exit 1; }
dynopool report "$d/run/last.pt" > "$d/report.log" 2>&1 || { echo "FAIL report: $(tail -1 "$d/report.log")"; exit 1; }
dynopool export "$d/run/last.pt" --format onnx --out "$d/m.onnx" > "$d/export.log" 2>&1 \
    || { echo "FAIL export: $(tail -2 "$d/export.log" | tr '\n' ' ')"; exit 1; }
echo "OK $model $px: $(grep -h 'saved FLOPs' "$d/ft.log" | tail -1 | grep -o 'saved FLOPs [^;]*') | $(grep -h 'max abs' "$d/export.log" | cut -c1-80)"
