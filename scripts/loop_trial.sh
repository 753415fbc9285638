#!/usr/bin/env bash
# The practitioner's loop, scripted (issue 26): messages data -> train with a validation split (--val-size 16),
# early stopping and sample generations -> chat answering prompts piped from a file -> merge -> the merged folder's
# model card, and summary.json saying the test split was scored with best-adapter/.
# Runs offline on the embedded default model (SmolLM2-135M-Instruct), 12 steps, a few minutes on a CPU:
#   scripts/loop_trial.sh [work folder]     (default: a fresh temporary folder)
set -euo pipefail
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python - "$work/chat.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
good, bad = "great fun moving superb charming".split(), "dull boring messy tedious weak".split()
with open(sys.argv[1], "w") as f:
    for i in range(200):
        label = "positive" if i % 2 == 0 else "negative"
        words = " ".join(rng.sample(good if label == "positive" else bad, 2))
        f.write(json.dumps({"messages": [
            {"role": "system", "content": "Classify the review as positive or negative."},
            {"role": "user", "content": f"Review {i}: a {words} film."},
            {"role": "assistant", "content": label}]}) + "\n")
PY
torchdora train --data "$work/chat.jsonl" --val-size 16 --test-size 0.1 --output-dir "$work/run" --steps 12 \
    --eval-every 4 --early-stopping-patience 2 --checkpoint-every 4 --sample-prompts 2 --sample-max-new-tokens 4 --max-eval 8 \
    --max-length 64 --warmup-steps 2
printf 'Review: a superb, charming film.\nReview: a dull and tedious film.\n/exit\n' > "$work/prompts.txt"
torchdora chat --adapter "$work/run/best-adapter" --system "Classify the review as positive or negative." \
    --max-new-tokens 8 < "$work/prompts.txt"
torchdora merge --adapter "$work/run/best-adapter" --output "$work/merged"
head -n 20 "$work/merged/README.md"
grep -q "^base_model: " "$work/merged/README.md" && grep -q "best_val_loss" "$work/merged/README.md"
grep -q '"test_scored_with": "best-adapter"' "$work/run/summary.json"  # the test split scored with the best adapter
echo "loop trial passed: $work"
