#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct: generate 64 perinucleus
# fingerprints, fine-tune them in (as raw text and as chat messages: the defaults), and check
# the fingerprinted model both ways, with the untouched base model as the null model. The
# check prints a row per format: raw text, and the key sent as a user message through the
# model's chat template, as any chat UI or chat API would send it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
fingerprints=results/demo_fingerprints.json

python generate_finetuning_data.py --key_response_strategy inverse_nucleus --num_fingerprints 64 \
    --batch_size 64 --output_file_path "$fingerprints" --overwrite
python finetune_multigpu.py --fingerprints_file_path "$fingerprints"
run=results/saved_models/$(cat current_config_hash.txt)
python check_fingerprints.py --model_path "$run/final_model" --run "$run" --output_json results/demo_report.json --overwrite
