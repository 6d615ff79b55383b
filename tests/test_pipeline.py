"""The Python API: README's example runs as written (with a tiny model), and settings are validated."""
import argparse
import json
import re
import runpy
import subprocess
import sys

import pytest

from oml import OMLError
from tests.conftest import ROOT


def readme_example() -> str:
    """The python block of README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_fingerprints_and_checks_a_model(tmp_path, tiny_model):
    code = readme_example()
    assert "MODEL = None" in code
    code = code.replace("MODEL = None", f"MODEL = {str(tiny_model)!r}", 1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[1].startswith("MATCH ") and " of 32 keys, p = " in lines[1]
    assert (tmp_path / "results" / "saved_models").is_dir() and len(lines) == 5


def test_settings_are_validated_when_made():
    import oml
    with pytest.raises(OMLError, match="learning_rate -1 is not a finite number > 0"):
        oml.TrainingConfig(learning_rate=-1)
    with pytest.raises(OMLError, match="key_format 'bogus' is not one of"):
        oml.TrainingConfig(key_format="bogus")
    with pytest.raises(OMLError, match="max_key_length 2.5 is not an integer >= 1"):
        oml.FingerprintSelection(max_key_length=2.5)
    with pytest.raises(OMLError, match="alpha 1 is not strictly between 0 and 1"):
        oml.VerdictConfig(alpha=1)
    assert oml.TrainingConfig(learning_rate=1).learning_rate == 1.0 and oml.TrainingConfig().updated(seed=3).seed == 3


def test_a_run_config_with_wrong_types_is_refused_on_load(tmp_path):
    from oml.runs import load_run
    (tmp_path / "fingerprints.json").write_text("[]")
    for bad in ({"model_path": 3}, {"model_path": "m", "max_key_length": "abc"}, {"model_path": "m", "max_key_length": -3},
                {"model_path": "m", "key_format": ["raw"]}, {"model_path": "m", "max_response_length": [1]}):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(OMLError, match="config.json"):
            load_run(tmp_path)


SCRIPTS = ["generate_finetuning_data.py", "finetune_multigpu.py", "check_fingerprints.py", "evaluate_utility.py",
           "evaluate_persistence.py", "evaluate_false_positives.py", "evaluate_robustness.py", "evaluate_stealth.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script, monkeypatch):
    """Each flag's --help text says its default (a value, 'none', or in words where it is decided at run time)."""
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / script), run_name="__main__")
    formatter = parsers[0]._get_formatter()
    for action in parsers[0]._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._get_help_string(action).lower(), action.option_strings[0]
