#!/usr/bin/env bash
# Train every bundled model on one GPU in about 9.5 minutes, as the committed weights were made:
# the VAE and the evaluator side by side, then the DiT and the UNet side by side on the same GPU, then measure.
#   bash diffptq/models/bundled/train_all.sh WORK_DIR LOG_DIR
# Budgets (minutes) can be overridden: VAE_MIN, EVAL_MIN, DIFF_MIN; extra trainer flags: EXTRA (e.g. "--device cpu").
set -uo pipefail
W=${1:-/tmp/bundled}
L=${2:-$W/logs}
mkdir -p "$W" "$L"
T="python -m diffptq.models.bundled.train"
$T --which vae --minutes "${VAE_MIN:-2}" --out "$W/vae" ${EXTRA:-} >"$L/vae.log" 2>&1 &
$T --which evaluator --minutes "${EVAL_MIN:-2}" --out "$W/evaluator" ${EXTRA:-} >"$L/evaluator.log" 2>&1 &
wait
test -f "$W/vae/config.json" || { echo "VAE training failed"; tail -20 "$L/vae.log"; exit 1; }
$T --which dit --minutes "${DIFF_MIN:-5.5}" --vae "$W/vae" --out "$W/dit" ${EXTRA:-} ${DIT_EXTRA:-} >"$L/dit.log" 2>&1 &
$T --which unet --minutes "${DIFF_MIN:-5.5}" --vae "$W/vae" --out "$W/unet" ${EXTRA:-} ${UNET_EXTRA:-} >"$L/unet.log" 2>&1 &
wait
python -m diffptq.models.bundled.measure --weights "$W" --json "$W/measure.json" --grid "$W/bundled_samples.png" \
  ${MEASURE_EXTRA:-} >"$L/measure.log" 2>&1
tail -n 5 "$L"/*.log
