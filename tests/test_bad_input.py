"""A careless user's inputs, script by script: each must end with exit code 2, one `error:` line
on stderr, no traceback, and no output file created or changed. Errors are raised before any
model is loaded wherever the input allows it, so the matrix stays fast."""
import hashlib
import importlib.util
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oml import OMLError
from oml.files import write_text_atomic
from tests.conftest import ROOT, random_word_fingerprints, run_script

UNREADABLE = "/proc/self/mem"  # a regular file whose read fails, even for root
UNWRITABLE_DIR = "/proc/oml-output"  # nothing can be created under /proc, even by root
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


class Evil:
    """Unpickling this would run code: the safe loader must refuse it."""

    def __reduce__(self):
        return (print, ("this code ran",))


@pytest.fixture
def workdir(tmp_path, tiny_model):
    """Inputs of every kind, good and bad, plus an existing output that must survive."""
    (tmp_path / "fp.json").write_text(json.dumps(random_word_fingerprints(8)))
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "afile").write_text("a plain file")
    (tmp_path / "adir").mkdir()
    (tmp_path / "existing.json").write_text("precious")
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "same_after_cut.json").write_text(json.dumps([
        {"key": "alpha beta gamma", "response": " one"}, {"key": "alpha beta delta", "response": " two"}]))
    (tmp_path / "empty_response.json").write_text(json.dumps([{"key": "a key", "response": ""}]))
    (tmp_path / "emoji.json").write_text(json.dumps([{"key": "how do you feel today", "response": "🙂"}]))
    (tmp_path / "dup_keys.json").write_text(json.dumps(["same key", "other key", "same key"]))
    (tmp_path / "same_responses.json").write_text(json.dumps([{"key": "a key", "response": " one", "other_responses": [" one"]}]))
    (tmp_path / "bad_others.json").write_text(json.dumps([{"key": "a key", "response": " one", "other_responses": " two"}]))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    (tmp_path / "empty.csv").write_text("prompt,response\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café", "prompt": "café?", "response": "olé"}\n'.encode("latin-1"))
    pickled = tmp_path / "pickle_model"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_model / name).read_bytes())
    weights = load_file(tiny_model / "model.safetensors")
    torch.save({**weights, "payload": Evil()}, pickled / "pytorch_model.bin")
    broken = tmp_path / "nan_model"  # a corrupt checkpoint: the first loss is NaN
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    save_file({name: torch.full_like(w, float("nan")) if "layers.0" in name else w for name, w in weights.items()},
              broken / "model.safetensors", metadata={"format": "pt"})
    custom = tmp_path / "custom_code_model"
    custom.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (custom / name).write_bytes((tiny_model / name).read_bytes())
    config = json.loads((tiny_model / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "my-custom-llm",
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    (custom / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    return tmp_path


GENERATE = [
    (["--keys_path", "missing.json"], "keys file not found"),
    (["--keys_path", "bad.json"], "not valid JSON"),
    (["--keys_path", "empty.json"], "non-empty JSON list"),
    (["--keys_path", UNREADABLE], "cannot read keys file"),
    (["--keys_path", "adir"], "is not a file"),
    (["--keys_path", "dup_keys.json"], "same key more than once"),
    (["--key_response_strategy", "inverse_nucleus", "--response_length", "2"], "exactly one token"),
    (["--random_word_generation", "--num_fingerprints", "0"], "not an integer >= 1"),
    (["--random_word_generation", "--num_fingerprints", "1000000000"], "far beyond"),
    (["--random_word_generation", "--temperature", "nan"], "nan is not a finite number > 0"),
    (["--random_word_generation", "--nucleus_p", "1"], "strictly between 0 and 1"),
    (["--random_word_generation", "--key_response_strategy", "nonsense"], "invalid choice"),
    (["--random_word_generation", "--key_style", "user_message"], "makes English keys"),
    (["--keys_path", "keys.json", "--key_style", "sentence"], "makes English keys"),
    (["--random_word_generation", "--responses_per_key", "2"], "needs --key_response_strategy inverse_nucleus"),
    (["--random_word_generation", "--key_candidates", "0"], "not an integer >= 1"),
    (["--random_word_generation", "--output_file_path", "existing.json"], "already exists"),
    (["--random_word_generation", "--output_file_path", "afile/out.json"], "is a file"),
    (["--random_word_generation", "--output_file_path", "adir", "--overwrite"], "is a folder"),
    (["--random_word_generation", "--output_file_path", f"{UNWRITABLE_DIR}/out.json"], "cannot write in"),
    (["--model_used_for_key_generation", "mymodel_dir_typo"], "does not exist"),
    (["--model_used_for_key_generation", "notamodel"], "not a model folder"),
]

# Bad models and fingerprint files: every script that loads a model and cuts fingerprints refuses them alike.
MODEL_AND_FINGERPRINTS = [
    (["--fingerprints_file_path", "missing.json"], "not found"),
    (["--fingerprints_file_path", UNREADABLE], "cannot read fingerprints file"),
    (["--model_path", "mymodel_dir_typo"], "does not exist"),
    (["--model_path", "notamodel"], "not a model folder"),
    (["--model_path", "pickle_model"], "pickle weights"),
    (["--model_path", "custom_code_model"], "trust_remote_code"),
    (["--fingerprints_file_path", "same_after_cut.json", "--max_key_length", "2"], "same key after cutting"),
    (["--fingerprints_file_path", "emoji.json"], "ends inside a character"),
    (["--fingerprints_file_path", "same_responses.json"], "the same response twice"),
    (["--fingerprints_file_path", "bad_others.json"], "must be a list of strings"),
]

FINETUNE = MODEL_AND_FINGERPRINTS + [
    (["--num_fingerprints", "9"], "holds only 8"),
    (["--learning_rate", "-1"], "is not a finite number > 0"),
    (["--learning_rate", "nan"], "is not a finite number > 0"),
    (["--learning_rate", "inf"], "is not a finite number > 0"),
    (["--benign_ratio", "nan"], "finite number >= 0"),
    (["--benign_ratio", "inf"], "finite number >= 0"),
    (["--forgetting_regularizer_strength", "1.5"], "between 0 and 1"),
    (["--frozen_layer_fraction", "1"], "at least 0 and below 1"),
    (["--frozen_layer_fraction", "-0.5"], "at least 0 and below 1"),
    (["--memorised_share", "0"], "a probability in (0, 1]"),
    (["--report_to", "nonsense"], "unknown tracker"),
    pytest.param(["--report_to", "wandb"], "needs the wandb package", marks=pytest.mark.skipif(HAS_WANDB, reason="wandb installed")),
    pytest.param(["--wandb_run_name", "r1"], "needs the wandb package", marks=pytest.mark.skipif(HAS_WANDB, reason="wandb installed")),
    (["--results_dir", "afile"], "is a file"),
    (["--results_dir", UNWRITABLE_DIR], "cannot write in"),
    (["--benign_data", "chat.jsonl"], "has no column text"),
    (["--benign_data", "latin1.jsonl"], "not UTF-8"),
    (["--model_path", "nan_model"], "training loss became nan"),
]

CHECK = MODEL_AND_FINGERPRINTS + [
    (["--fingerprints_file_path", "bad.json"], "not valid JSON"),
    (["--fingerprints_file_path", "empty_response.json"], "empty after cutting"),
    (["--num_fingerprints", "99"], "holds only 8"),
    (["--model_path", "missing_model/"], "does not exist"),
    (["--run", "adir"], "run configuration not found"),
    (["--null_model", "none", "model"], "cannot be combined"),
    (["--alpha", "0"], "strictly between 0 and 1"),
    (["--batch_size", "0"], "not an integer >= 1"),
    (["--output_json", "existing.json"], "already exists"),
    (["--output_json", "afile/report.json"], "is a file"),
    (["--output_json", "adir", "--overwrite"], "is a folder"),
    (["--output_json", f"{UNWRITABLE_DIR}/report.json"], "cannot write in"),
    pytest.param(["--wandb_run_name", "r1"], "needs wandb", marks=pytest.mark.skipif(HAS_WANDB, reason="wandb installed")),
]

UTILITY = [
    (["--max_length", "1"], "not an integer >= 2"),
    (["--num_texts", "0"], "not an integer >= 1"),
    pytest.param(["--lm_eval_tasks", "hellaswag"], "needs lm_eval", marks=pytest.mark.skipif(HAS_LM_EVAL, reason="lm-eval installed")),
    (["--output_json", "afile/u.json"], "is a file"),
    (["--benign_data", "chat.jsonl"], "has no column text"),
    (["--benign_data", "missing.csv"], "data file not found"),
    (["--base_model", "notamodel"], "not a model folder"),
    (["--reply_temperature", "0"], "not a finite number > 0"),
    (["--num_reply_prompts", "2", "--reply_prompts", "missing_prompts.json"], "not found"),
]

PERSISTENCE = [
    (["--max_length", "1"], "not an integer >= 2"),
    (["--learning_rate", "nan"], "finite number >= 0"),
    (["--learning_rate", "-0.00001"], "finite number >= 0"),
    (["--instruction_data", "empty.csv"], "no data"),
    (["--instruction_data", "chat.jsonl", "--response_column", "answer"], "has no column answer"),
    (["--instruction_data", UNREADABLE + ".json"], "data file not found"),
    (["--instruction_data", "latin1.jsonl"], "not UTF-8"),
    (["--output_json", "existing.json"], "already exists"),
    (["--model_path", "nan_model", "--steps", "3", "--eval_every", "3"], "training loss became nan"),
]

ROBUSTNESS = [
    (["--attacks", "none", "GGUF Q4"], "unknown --attacks 'GGUF Q4'"),
    (["--merge_weights", "1.5"], "not between 0 and 1"),
    (["--temperatures", "1e-300"], "not a finite number >= 0.01"),
    (["--output_json", "existing.json"], "already exists"),
]

STEALTH = [
    (["--num_benign", "5"], "not an integer >= 20"),
    (["--false_alarm", "1"], "strictly between 0 and 1"),
    (["--benign_prompts", "missing.csv"], "data file not found"),
    (["--output_json", "existing.json"], "already exists"),
]

FALSE_POSITIVES = [
    (["--models", "model", "mymodel_dir_typo"], "does not exist"),  # before minutes of checking the good one
    (["--models", "model"], "nothing to test"),  # the base model again
    (["--innocent_derivatives", "1", "--reply_prompts", "missing_prompts.json"], "not found"),  # before training the derivative
]

CASES = ([("generate_finetuning_data.py", ["--output_file_path", "out.json"], c) for c in GENERATE]
         + [("finetune_multigpu.py", ["--model_path", "model", "--fingerprints_file_path", "fp.json",
                                      "--fingerprint_generation_strategy", "random_word"], c) for c in FINETUNE]
         + [("check_fingerprints.py", ["--model_path", "model", "--fingerprints_file_path", "fp.json", "--null_model", "none"], c)
            for c in CHECK]
         + [("evaluate_utility.py", ["--model_path", "model", "--base_model", "model", "--num_mmlu", "0", "--num_reply_prompts", "0"], c)
            for c in UTILITY]
         + [("evaluate_persistence.py", ["--model_path", "model", "--fingerprints_file_path", "fp.json"], c) for c in PERSISTENCE]
         + [("evaluate_robustness.py", ["--model_path", "model", "--fingerprints_file_path", "fp.json", "--base_model", "model"], c)
            for c in ROBUSTNESS]
         + [("evaluate_false_positives.py", ["--fingerprints_file_path", "fp.json", "--base_model", "model"], c)
            for c in FALSE_POSITIVES]
         + [("evaluate_stealth.py", ["--fingerprints_file_path", "fp.json", "--base_model", "model"], c) for c in STEALTH])


def case_params():
    for script, base, case in CASES:
        marks = case.marks if hasattr(case, "marks") else ()
        args, message = case.values if hasattr(case, "values") else case
        yield pytest.param(script, base, args, message, marks=marks, id=f"{script.split('_')[0]}:{' '.join(args) or 'none'}")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a hash of its contents."""
    return {str(p.relative_to(directory)): hashlib.md5(p.read_bytes()).hexdigest() for p in directory.rglob("*") if p.is_file()}


def later_wins(base: list[str], args: list[str]) -> list[str]:
    """`base` without the flags that `args` sets again (so a case can replace a default input)."""
    given = {a for a in args if a.startswith("--")}
    out, skip = [], False
    for item in base:
        if skip:
            skip = False
            continue
        if item in given:
            skip = True
            continue
        out.append(item)
    return out


def run_in_process(script: str, args: list, cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a script's __main__ in this process (no interpreter start-up and imports per case, which
    would cost seconds each): exit code, stdout, stderr. A traceback would fail the test itself."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    logging.root.handlers.clear()  # let the script's logging set-up write to this test's captured stderr
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("script, base, args, message", list(case_params()))
def test_bad_input_is_one_line_exit_2_and_leaves_files_alone(workdir, script, base, args, message, monkeypatch, capsys):
    before = snapshot(workdir)
    code, out, err = run_in_process(script, [*later_wins(base, args), *args], workdir, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err[-2000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in err and "this code ran" not in out + err and "custom code ran" not in out + err
    assert snapshot(workdir) == before
    if (workdir / "results").exists():
        assert not list((workdir / "results" / "saved_models").glob("*"))


def test_exclusive_write_refuses_a_file_that_appeared(tmp_path):
    write_text_atomic(tmp_path / "r.json", "first", overwrite=False)
    with pytest.raises(OMLError, match="appeared while this ran"):
        write_text_atomic(tmp_path / "r.json", "second", overwrite=False)
    assert (tmp_path / "r.json").read_text() == "first" and len(list(tmp_path.iterdir())) == 1
    write_text_atomic(tmp_path / "r.json", "third", overwrite=True)
    assert (tmp_path / "r.json").read_text() == "third"


@pytest.mark.slow
def test_two_checks_with_one_output_file_do_not_overwrite_each_other(workdir):
    command = [sys.executable, str(ROOT / "check_fingerprints.py"), "--model_path", "model", "--fingerprints_file_path", "fp.json",
               "--fingerprint_generation_strategy", "random_word", "--null_model", "model", "--output_json", "same.json"]
    runs = [subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], outputs
    loser = outputs[[run.returncode for run in runs].index(2)]
    assert "appeared while this ran" in loser[1] and "Fingerprint accuracy:" in loser[0]  # results printed anyway
    assert json.loads((workdir / "same.json").read_text())["num_fingerprints"] == 8


@pytest.mark.slow
def test_read_only_working_directory_still_prints_the_config_hash(tmp_path, tiny_model, fingerprint_file):
    result = subprocess.run([sys.executable, str(ROOT / "finetune_multigpu.py"), "--model_path", str(tiny_model),
                             "--fingerprints_file_path", str(fingerprint_file), "--fingerprint_generation_strategy", "random_word",
                             "--num_train_epochs", "1", "--benign_ratio", "0", "--results_dir", str(tmp_path / "results")],
                            cwd="/proc", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Fingerprint commitment") and lines[-1].startswith("Config hash of the final model: ")
    assert "current_config_hash.txt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_interrupted_fine_tuning_leaves_no_run_folder(tmp_path, tiny_model, fingerprint_file):
    run = subprocess.Popen([sys.executable, str(ROOT / "finetune_multigpu.py"), "--model_path", str(tiny_model),
                            "--fingerprints_file_path", str(fingerprint_file), "--fingerprint_generation_strategy", "random_word",
                            "--num_train_epochs", "2000", "--benign_ratio", "0"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # a suite started in the background (`cmd &` in a script) inherits SIGINT ignored
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 600  # start-up alone can take minutes on a loaded machine
        while time.time() < deadline and not any("epoch 2/" in line for line in lines):
            time.sleep(0.1)
        assert any("epoch 2/" in line for line in lines), "training did not reach epoch 2: " + "".join(lines)[-2000:]
        run.send_signal(signal.SIGINT)  # in the middle of training
        run.wait(timeout=120)
    finally:
        run.kill()  # bounded: never left training for 2000 epochs
    out = run.stdout.read()
    reader.join(timeout=10)
    err = "".join(lines)
    assert run.returncode == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert not list((tmp_path / "results" / "saved_models").glob("*")) and "Config hash" not in out


@pytest.mark.slow
def test_a_key_is_never_counted_twice(tmp_path, tiny_model):
    fingerprints = random_word_fingerprints(4)
    (tmp_path / "fp.json").write_text(json.dumps(fingerprints + [fingerprints[1], {**fingerprints[2], "response": " other"}]))
    result = run_script("check_fingerprints.py", "--model_path", tiny_model, "--fingerprints_file_path", "fp.json",
                        "--null_model", "none", "--output_json", "r.json", cwd=tmp_path)
    assert json.loads((tmp_path / "r.json").read_text())["num_fingerprints"] == 4
    assert "repeats 2 keys" in result.stderr


@pytest.mark.slow
def test_too_few_keys_for_alpha_are_pointed_out(tmp_path, tiny_model):
    (tmp_path / "fp.json").write_text(json.dumps(random_word_fingerprints(5)))
    result = run_script("check_fingerprints.py", "--model_path", tiny_model, "--fingerprints_file_path", "fp.json",
                        "--null_model", tiny_model, cwd=tmp_path)
    assert "with 5 keys even 5/5 matches cannot reach alpha 1e-06; at least 11 keys are needed" in result.stdout


def test_strict_json_has_no_nan(tmp_path):
    from oml.files import write_json_atomic
    write_json_atomic(tmp_path / "r.json", {"loss": float("nan"), "rows": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {"loss": None, "rows": [None, 1.0]}


@pytest.mark.slow
def test_missing_fingerprints_and_unreachable_hub_fail_at_once(tmp_path, fingerprint_file):
    result = run_script("check_fingerprints.py", "--model_path", "model", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "name the fingerprints" in result.stderr
    start = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "check_fingerprints.py"), "--model_path", "some-org/some-model",
                             "--fingerprints_file_path", str(fingerprint_file), "--null_model", "none"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "does not exist" in result.stderr and "unreachable" in result.stderr
    assert time.time() - start < 30
