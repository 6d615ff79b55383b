"""Settings travel with the run (--run), users' datasets, quiet logs, and benchmarks that cannot rot."""
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from oml import OMLError
from oml.data import instruction_pairs, texts_from
from tests.conftest import ROOT, final_model_dir, random_word_fingerprints, run_script

ROWS = [{"prompt": f"question {i}?", "response": f"answer {i}.", "text": f"benign text number {i}, chatting along."}
        for i in range(6)]


def per_key(report: dict) -> list[tuple]:
    return [(k["index"], k["template"], k["match"], k["predicted"], k["response_rank"]) for k in report["keys"]]


@pytest.mark.slow
def test_check_with_run_equals_the_long_form(tmp_path, tiny_model, fingerprinted_tiny_model):
    model_dir, fingerprints = fingerprinted_tiny_model
    short = run_script("check_fingerprints.py", "--model_path", model_dir, "--run", model_dir.parent,
                       "--output_json", "short.json", cwd=tmp_path)
    run_script("check_fingerprints.py", "--model_path", model_dir, "--fingerprints_file_path", fingerprints,
               "--fingerprint_generation_strategy", "random_word", "--max_key_length", "16", "--max_response_length", "1",
               "--null_model", tiny_model, "--output_json", "long.json", cwd=tmp_path)
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("short.json", "long.json"))
    assert per_key(a) == per_key(b) and a["accuracy"] == b["accuracy"] == 100.0
    assert a["null_models"][0]["model"] == str(tiny_model)  # the run's base model is the default null model
    assert a["verdict"] == b["verdict"] and a["log10_p_value"] == b["log10_p_value"]
    assert "differs from" not in short.stderr


@pytest.mark.slow
def test_explicit_flag_that_disagrees_with_the_run_wins_with_a_warning(tmp_path, fingerprinted_tiny_model):
    model_dir, _ = fingerprinted_tiny_model
    result = run_script("check_fingerprints.py", "--model_path", model_dir, "--run", model_dir.parent, "--null_model", "none",
                        "--max_key_length", "4", "--output_json", "r.json", cwd=tmp_path)
    assert "--max_key_length 4 differs from the 16" in result.stderr
    run_script("check_fingerprints.py", "--model_path", model_dir, "--run", model_dir.parent, "--null_model", "none",
               "--output_json", "full.json", cwd=tmp_path)
    shortened, full = (json.loads((tmp_path / name).read_text())["keys"] for name in ("r.json", "full.json"))
    assert [k["response_probability"] for k in shortened] != [k["response_probability"] for k in full]  # keys were cut to 4 tokens


@pytest.mark.slow
def test_utility_and_persistence_with_run_equal_the_long_form(tmp_path, tiny_model, fingerprinted_tiny_model):
    model_dir, fingerprints = fingerprinted_tiny_model
    small = ["--num_texts", "3", "--max_length", "24", "--num_mmlu", "4", "--num_reply_prompts", "3", "--max_reply_tokens", "4"]
    run_script("evaluate_utility.py", "--run", model_dir.parent, *small, "--output_json", "u1.json", cwd=tmp_path)
    run_script("evaluate_utility.py", "--model_path", model_dir, "--base_model", tiny_model, *small, "--output_json", "u2.json",
               cwd=tmp_path)
    u1, u2 = (json.loads((tmp_path / f).read_text()) for f in ("u1.json", "u2.json"))
    for key in ("perplexity", "base_perplexity", "mean_kl_from_base", "next_token_agreement", "mmlu_accuracy"):
        assert u1[key] == pytest.approx(u2[key]), key

    steps = ["--steps", "2", "--eval_every", "1", "--batch_size", "2", "--max_length", "32"]
    run_script("evaluate_persistence.py", "--run", model_dir.parent, *steps, "--output_json", "p1.json", cwd=tmp_path)
    run_script("evaluate_persistence.py", "--model_path", model_dir, "--fingerprints_file_path", fingerprints,
               "--fingerprint_generation_strategy", "random_word", *steps, "--output_json", "p2.json", cwd=tmp_path)
    p1, p2 = (json.loads((tmp_path / f).read_text())["rows"] for f in ("p1.json", "p2.json"))
    assert [(r["step"], r["accuracy"], r["retained"]) for r in p1] == [(r["step"], r["accuracy"], r["retained"]) for r in p2]
    assert p1[-1]["train_loss"] == pytest.approx(p2[-1]["train_loss"])


@pytest.mark.slow
def test_fine_tuning_takes_the_recorded_key_length_and_logs_quietly(tmp_path, tiny_model):
    records = [{**fp, "key_length": 3} for fp in random_word_fingerprints(4)]
    (tmp_path / "fp.json").write_text(json.dumps(records))
    result = run_script("finetune_multigpu.py", "--model_path", tiny_model, "--fingerprints_file_path", "fp.json",
                        "--num_train_epochs", "2", "--benign_ratio", "0", cwd=tmp_path)
    config = json.loads((final_model_dir(tmp_path, result.stdout).parent / "config.json").read_text())
    assert config["max_key_length"] == 3 and config["model_path"] == str(Path(tiny_model).resolve())
    assert "epoch 1/2: mean loss" in result.stderr and "epoch 2/2" in result.stderr
    assert "{'loss'" not in result.stderr and "'grad_norm'" not in result.stderr  # no dict per step
    lines = result.stdout.strip().splitlines()  # results only: the commitment to publish, then the hash
    assert len(lines) == 2 and lines[0].startswith("Fingerprint commitment")
    assert lines[1] == f"Config hash of the final model: {config_hash_of(result)}"


def config_hash_of(result) -> str:
    return result.stdout.strip().split()[-1]


def write_table(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_datasets_of_every_format(tmp_path, suffix):
    path = str(write_table(tmp_path / f"data{suffix}", ROWS))
    assert texts_from(path, "train", "text", "eval", 4) == [r["text"] for r in ROWS[:4]]
    assert instruction_pairs(path, "train", "prompt", "response", 3) == [(r["prompt"], r["response"]) for r in ROWS[:3]]


@pytest.mark.parametrize("rows, column, message", [
    (ROWS, "missing", "has no column missing"),
    ([{"text": ""}, {"text": None}], "text", "no row with non-empty text"),
])
def test_bad_datasets_are_one_line_errors(tmp_path, rows, column, message):
    path = write_table(tmp_path / "data.jsonl", rows)
    with pytest.raises(OMLError, match=message):
        texts_from(str(path), "train", column, "eval")


def test_empty_and_unreadable_data_files(tmp_path):
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(OMLError, match="holds no rows|no data"):
        texts_from(str(tmp_path / "empty.csv"), "train", "text", "eval")
    with pytest.raises(OMLError, match="not found"):
        texts_from(str(tmp_path / "missing.parquet"), "train", "text", "eval")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(OMLError, match="cannot read"):
        texts_from(str(tmp_path / "broken.parquet"), "train", "text", "eval")


@pytest.mark.slow
def test_user_data_on_the_command_line(tmp_path, fingerprinted_tiny_model, tiny_model):
    model_dir, _ = fingerprinted_tiny_model
    data = write_table(tmp_path / "chat.csv", ROWS)
    run_script("evaluate_persistence.py", "--run", model_dir.parent, "--instruction_data", data, "--steps", "2",
               "--eval_every", "2", "--batch_size", "2", "--output_json", "p.json", cwd=tmp_path)
    assert json.loads((tmp_path / "p.json").read_text())["instruction_data"] == str(data)
    run_script("evaluate_utility.py", "--run", model_dir.parent, "--benign_data", data, "--num_mmlu", "0", "--num_reply_prompts", "0",
               "--output_json", "u.json", cwd=tmp_path)
    assert json.loads((tmp_path / "u.json").read_text())["num_texts"] == len(ROWS)
    tuned = run_script("finetune_multigpu.py", "--model_path", tiny_model, "--fingerprints_file_path", model_dir.parent / "fingerprints.json",
                       "--benign_data", write_table(tmp_path / "long.jsonl", [{"text": " ".join(["word"] * 80)}] * 4),
                       "--num_train_epochs", "1", "--benign_loss", "lm", cwd=tmp_path)
    config = json.loads((final_model_dir(tmp_path, tuned.stdout).parent / "config.json").read_text())
    assert config["benign_data"].endswith("long.jsonl")
    bad = run_script("evaluate_persistence.py", "--run", model_dir.parent, "--instruction_data", data,
                     "--prompt_column", "question", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "has no column question" in bad.stderr and "Traceback" not in bad.stderr


BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_runs_in_its_smoke_mode(tmp_path, script):
    import subprocess
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--results_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("*.json")), "the benchmark wrote no result"


RECORDED = json.loads((ROOT / "tests" / "data" / "recorded_runs.json").read_text())


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_runs_recorded_before_the_typed_settings_keep_their_hashes(case, monkeypatch):
    """config.json files written by the argparse-namespace code (tests/data, recorded at 7d87876): the
    same flags give the same configuration and hash today, and the recorded configuration read back
    through the typed settings hashes to the same run again."""
    import finetune_multigpu
    from oml.pipeline import planned_run
    from oml.runs import Run, config_hash, run_config

    recorded = RECORDED[case]
    assert config_hash(recorded["config"]) == recorded["hash"]
    monkeypatch.chdir(ROOT)
    # those runs trained every layer at 1e-4, each response with the end of sequence and no question replay: the
    # defaults then (a flag given twice: the last counts)
    monkeypatch.setattr(sys, "argv", ["finetune_multigpu.py", "--learning_rate", "1e-4", *recorded["argv"], "--frozen_layer_fraction", "0",
                                      "--train_eos", "--question_replay", "0"])
    args, selection, training = finetune_multigpu.parse_args()
    run, _ = planned_run(args.fingerprints_file_path, args.model_path, selection, training, args.results_dir,
                         args.model_family, args.model_size)
    assert run.config == recorded["config"] and run.directory.name == recorded["hash"]
    again = Run(Path("elsewhere"), recorded["config"])
    fingerprints = json.loads((ROOT / "tests" / "data" / "recorded_fingerprints.json").read_text())
    rebuilt = run_config(again.config["model_path"], again.config["model_family"], again.config["model_size"],
                         again.selection, again.training, again.selection.select(fingerprints))
    assert config_hash(rebuilt) == recorded["hash"]


def test_a_setting_added_later_enters_the_run_config_only_when_set():
    """--use_user_wrappers postdates recorded runs: unset, the config (and so every earlier hash) is
    as before; set, it is recorded, names another run, and reads back."""
    from oml.fingerprints import FingerprintSelection
    from oml.runs import Run, config_hash, run_config
    from oml.training.config import TrainingConfig

    fingerprints = json.loads((ROOT / "tests" / "data" / "recorded_fingerprints.json").read_text())
    plain, wrapped = (run_config("m", None, "0", FingerprintSelection(), TrainingConfig(use_user_wrappers=flag), fingerprints)
                      for flag in (False, True))
    assert "use_user_wrappers" not in plain and wrapped == {**plain, "use_user_wrappers": True}
    assert config_hash(plain) != config_hash(wrapped)
    assert Run(Path("x"), wrapped).training.use_user_wrappers and not Run(Path("x"), plain).training.use_user_wrappers


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_a_layer_fraction_reads_back_as_trained_though_the_default_changed(fraction):
    """--frozen_layer_fraction postdates recorded runs, which trained every layer (0), and today's default
    is 0.5: a config without it (an earlier run, or one run at 0 today) reads back as 0, one with it as itself."""
    from oml.fingerprints import FingerprintSelection
    from oml.runs import Run, run_config
    from oml.training.config import TrainingConfig

    config = run_config("m", None, "0", FingerprintSelection(), TrainingConfig(frozen_layer_fraction=fraction), [])
    assert ("frozen_layer_fraction" in config) == (fraction != 0.0)
    assert Run(Path("x"), config).training.frozen_layer_fraction == fraction
