#!/usr/bin/env bash
# End to end on hand-written models no issue names (module:factory sources, as a user's own):
# dynopool convert --budget B -> finetune 3 steps with learning strides on Fashion-MNIST ->
# report -> ONNX export. One line per model: OK, or FAIL <stage>: <its one-line error>.
#
#   bash benchmarks/e2e/custom/run_all.sh [/usr/share/datasets/fashion-mnist] [OUT]
#   ONLY="exotic exotic2 pvt softsplit swin_det" bash benchmarks/e2e/custom/run_all.sh   # those files' models only
#
# Results (sessions 18 to 22) in docs/BENCHMARKS.md, "Hand-written models".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
data=${1:-/usr/share/datasets/fashion-mnist}; root=${2:-/tmp/e2e_custom}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {  # module:factory input-size budget(- for none) [export flags]
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" ${1%%:*} "* ]]; then return; fi
    local d="$root/${1//:/_}"; rm -rf "$d"; mkdir -p "$d"
    local budget=(--budget "$3"); [ "$3" = "-" ] && budget=()  # -: no budget
    dynopool convert "$1" --input-size "$2" "${budget[@]}" --out "$d/c.pt" > "$d/convert.log" 2>&1 \
        || { echo "$1: FAIL convert: $(tail -1 "$d/convert.log")"; return; }
    dynopool finetune "$d/c.pt" --trust-source --data "fashion-mnist:$data" --steps 3 --batch-size 8 \
        --val-limit 200 --scale-lr 0.01 --out "$d/run" > "$d/ft.log" 2>&1 \
        || { echo "$1: FAIL finetune: $(tail -1 "$d/ft.log")"; return; }
    dynopool report "$d/run/last.pt" --trust-source > "$d/report.log" 2>&1 \
        || { echo "$1: FAIL report: $(tail -1 "$d/report.log")"; return; }
    dynopool export "$d/run/last.pt" --trust-source --format onnx --out "$d/m.onnx" ${4:-} > "$d/export.log" 2>&1 \
        || { echo "$1: FAIL export: $(tail -1 "$d/export.log")"; return; }
    echo "$1: OK $(grep -ho 'saved FLOPs [^;]*' "$d/ft.log" | tail -1) | $(grep -h 'max abs' "$d/export.log" | cut -c1-60)"
}
for m in Blur Unshuffle Odd FracPool; do run "exotic:$m" 32 0.7x; done
run exotic:Hourglass 32 0.85x
run exotic:Gray 1,32,32 0.7x
for m in TupleOut Unpool; do run "exotic:$m" 32 0.7x; done
for m in DynSizeInterp SliceSub ShuffleUp PatchViT SpaceToDepth Focus; do run "exotic2:$m" 32 0.9x; done
for m in PVT TwinsSVT PVTv1Code; do run "pvt:$m" 32 0.8x; done
run softsplit:T2T 32 0.8x
# its window reverse computes the batch as int(windows / (H * W / ws^2)), which the exporters fix
run swin_det:SwinDet 32 0.8x "--batch 1"
run cifar_resnet:resnet20 32 0.7x
run tutorials:STN 1,28,28 0.8x
for m in ResNet18 ShuffleNetV2 DenseNet; do run "kuangliu:$m" 32 0.8x; done
for m in GoogLeNet MobileNetV2 PreActResNet18 SENet18 VGG SimpleDLA; do run "kuangliu2:$m" 32 0.8x; done
if python -c "import einops" 2>/dev/null; then  # vit-pytorch style models need einops (pip install einops)
    for m in CCT CCTCls SimpleViT ViT MAEPatchify PiT; do run "vitpytorch:$m" 32 0.8x; done
fi
