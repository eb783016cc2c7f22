#!/usr/bin/env bash
# The generator's REST API with curl alone: upload a classifier, submit a job with a guide image,
# poll it, read the run's results, cancel a second job, clean up. Python makes the two input files
# (a classifier's safetensors weights, a guide PNG) and reads the JSON answers.
#   ACTGEN_GENERATOR_URL (default http://127.0.0.1:8000), ACTGEN_API_KEY (if the service has one),
#   PYTHON (default python3, with actgen-shared and torch installed), OUT (a JSON summary file)
set -euo pipefail
URL=${ACTGEN_GENERATOR_URL:-http://127.0.0.1:8000}
PY=${PYTHON:-python3}
AUTH=()
[[ -n ${ACTGEN_API_KEY:-} ]] && AUTH=(-H "Authorization: Bearer $ACTGEN_API_KEY")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
api() { curl -sS --fail-with-body "${AUTH[@]}" "$@"; }
field() { "$PY" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
RUN="rest-$(date +%s)-$$"

# 1. a classifier: safetensors weights of a registry architecture, plus its metadata
"$PY" -c 'import sys; from safetensors.torch import save_file
from actgen_shared.architectures import build_classifier
save_file(build_classifier("simple_cnn", 10).state_dict(), sys.argv[1])' "$TMP/classifier.safetensors"
META='{"architecture": "simple_cnn", "num_classes": 10, "input_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}'
REF=$(api -F "weights=@$TMP/classifier.safetensors" -F "metadata=$META" "$URL/v1/classifiers" | field ref)
echo "classifier $REF"

# 2. a job: one guide image (base64 PNG) of class 3, adversarial guidance with that classifier
"$PY" -c 'import sys; from PIL import Image; from actgen_shared.digits import load_digits_split
split = load_digits_split(16); Image.fromarray(split.train_images[(split.train_labels == 3).argmax()]).save(sys.argv[1])' "$TMP/guide.png"
job_body() {  # $1: DDPM steps
  cat <<JSON
{"run_id": "$RUN", "label_set": "digits", "classifier_ref": "$REF", "memory_bank_key": "$RUN",
 "items": [{"image": "$(base64 < "$TMP/guide.png" | tr -d '\n')", "class_id": 3, "guide_id": "guide-3"}],
 "options": {"mode": "actgen", "adv_prob": 0.5, "num_inference_steps": $1, "grad_steps": 1,
             "height": 64, "width": 64, "bank_sample": 16, "seed": 0}}
JSON
}
JOB=$(job_body 2 | api -H "Content-Type: application/json" --data @- "$URL/v1/jobs" | field job_id)
echo "job $JOB"

# 3. poll until it ends
for _ in $(seq 600); do
  STATUS=$(api "$URL/v1/jobs/$JOB" | field status)
  [[ $STATUS == done || $STATUS == failed || $STATUS == cancelled ]] && break
  sleep 0.2
done
echo "job $JOB $STATUS"

# 4. the run's results: every finished image after a cursor (keep "next" to resume), and one PNG
api "$URL/v1/runs/$RUN/results?after=0-0&limit=100" > "$TMP/results.json"
RESULTS=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["items"]))' "$TMP/results.json")
api "$URL/v1/jobs/$JOB/images/0.png" -o "$TMP/generated.png"
echo "results $RESULTS, first image $(wc -c < "$TMP/generated.png") bytes"

# 5. cancel: a long job, cancelled at once (a running one stops at its next step)
LONG=$(job_body 200 | api -H "Content-Type: application/json" --data @- "$URL/v1/jobs" | field job_id)
echo "job $LONG $(api -X DELETE "$URL/v1/jobs/$LONG" | field status), cancel asked"
for _ in $(seq 300); do
  CANCELLED=$(api "$URL/v1/jobs/$LONG" | field status)
  [[ $CANCELLED == cancelled || $CANCELLED == done || $CANCELLED == failed ]] && break
  sleep 0.2
done
echo "job $LONG $CANCELLED"

# 6. clean up what the run left: its memory bank, and its classifier once no job uses it (409 until then)
api -X DELETE "$URL/v1/memory-banks/$RUN" > /dev/null
for _ in $(seq 50); do
  CODE=$(curl -sS -o /dev/null -w '%{http_code}' "${AUTH[@]}" -X DELETE "$URL/v1/classifiers/$REF")
  [[ $CODE != 409 ]] && break
  sleep 0.2
done
SUMMARY="{\"run_id\": \"$RUN\", \"classifier_ref\": \"$REF\", \"job_status\": \"$STATUS\", \"results\": $RESULTS, \"image_bytes\": $(wc -c < "$TMP/generated.png"), \"cancelled_status\": \"$CANCELLED\", \"classifier_delete\": $CODE}"
echo "$SUMMARY"
[[ -n ${OUT:-} ]] && echo "$SUMMARY" > "$OUT"
exit 0
