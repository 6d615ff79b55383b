#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct: generate 64 perinucleus
# fingerprints, fine-tune them in, check the fingerprinted model (the untouched base model
# is checked too, as the null model) and print the success rate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
fingerprints=results/demo_fingerprints.json

python generate_finetuning_data.py --key_response_strategy inverse_nucleus --num_fingerprints 64 \
    --key_length 16 --batch_size 64 --output_file_path "$fingerprints" --overwrite
python finetune_multigpu.py --fingerprints_file_path "$fingerprints" --fingerprint_generation_strategy inverse_nucleus
python check_fingerprints.py --model_path "results/saved_models/$(cat current_config_hash.txt)/final_model" \
    --fingerprints_file_path "$fingerprints" --fingerprint_generation_strategy inverse_nucleus \
    --output_json results/demo_report.json --overwrite
