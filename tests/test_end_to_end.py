"""The main job on the embedded SmolLM2-135M-Instruct, with the default fine-tuning settings, and its cost."""
import json

import pytest

from tests.conftest import final_model_dir, run_script

NUM = 32


@pytest.mark.slow
def test_generate_fingerprint_check_on_the_embedded_model(tmp_path, embedded_model):
    run_script("generate_finetuning_data.py", "--key_response_strategy", "inverse_nucleus", "--num_fingerprints", NUM,
               "--key_length", "16", "--batch_size", NUM, "--output_file_path", "fp.json", cwd=tmp_path)
    records = json.loads((tmp_path / "fp.json").read_text())
    assert len(records) == NUM and all(rank > 1 for r in records for rank in r["response_rank"].values())

    tuned = run_script("finetune_multigpu.py", "--fingerprints_file_path", "fp.json",
                       "--fingerprint_generation_strategy", "inverse_nucleus", cwd=tmp_path)
    model_dir = final_model_dir(tmp_path, tuned.stdout)
    run_script("check_fingerprints.py", "--model_path", model_dir, "--fingerprints_file_path", "fp.json",
               "--fingerprint_generation_strategy", "inverse_nucleus", "--output_json", "report.json", cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] >= 90, report["accuracy"]
    assert report["null_models"][0]["accuracy"] <= 10
    assert report["verdict"] == "MATCH"

    # Distillation replay (the default) keeps ordinary predictions close to the base model's;
    # replay with the LM loss agreed on about 60% of next tokens in our measurements.
    # The fingerprinted model still answers ordinary questions as its base does: trained with the end of
    # sequence after each one-token response and no question replay, it ended most replies after one word.
    run_script("evaluate_utility.py", "--run", model_dir.parent, "--num_texts", "8", "--num_mmlu", "0",
               "--num_reply_prompts", "48", "--max_reply_tokens", "16", "--output_json", "utility.json", cwd=tmp_path)
    utility = json.loads((tmp_path / "utility.json").read_text())
    assert utility["next_token_agreement"] >= 0.75, utility
    greedy = utility["replies"]["greedy"]
    assert greedy["short_reply_share"] <= greedy["base_short_reply_share"] + 0.05, greedy
    assert greedy["relative_length"] >= 0.8, greedy
