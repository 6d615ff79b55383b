import json
import logging
from types import SimpleNamespace

import pytest

from oml import OMLError
from oml.data import words
from oml.fingerprints import (FingerprintSelection, load_fingerprints, load_keys, select_fingerprints, selected_fingerprints,
                              warn_on_key_length_mismatch)


def write(tmp_path, content: str):
    path = tmp_path / "file.json"
    path.write_text(content)
    return path


def test_load_fingerprints_keeps_extra_fields(tmp_path):
    records = [{"key": "k", "response": "r", "response_rank": 4}]
    assert load_fingerprints(write(tmp_path, json.dumps(records))) == records


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[]", "non-empty"),
    ('[{"key": "k"}]', "'key' and 'response'"),
    ('{"key": "k", "response": "r"}', "non-empty JSON list"),
])
def test_load_fingerprints_rejects_bad_files(tmp_path, content, message):
    with pytest.raises(OMLError, match=message):
        load_fingerprints(write(tmp_path, content))


def test_load_fingerprints_missing_file(tmp_path):
    with pytest.raises(OMLError, match="not found"):
        load_fingerprints(tmp_path / "nope.json")


def test_load_keys_accepts_strings_and_objects(tmp_path):
    assert load_keys(write(tmp_path, '["a", {"key": "b", "response": "x"}]')) == ["a", "b"]
    with pytest.raises(OMLError, match="entry 1"):
        load_keys(write(tmp_path, '["a", 3]'))


def test_select_fingerprints_offsets_counts_and_errors():
    records = [{"key": f"k{i}", "response": f"r{i}"} for i in range(10)]
    assert [r["key"] for r in select_fingerprints(records, 3, 2, "english")] == ["k2", "k3", "k4"]
    assert len(select_fingerprints(records, None, 4, "english")) == 6
    with pytest.raises(OMLError, match="holds only 10"):
        select_fingerprints(records, 9, 2, "english")
    with pytest.raises(OMLError, match="unknown fingerprint strategy"):
        select_fingerprints(records, 1, 0, "nonsense")


def test_english_random_response_is_one_word_fixed_by_the_key():
    records = [{"key": f"key number {i}", "response": "long original response"} for i in range(20)]
    first = select_fingerprints(records, None, 0, "english_random_response")
    again = select_fingerprints(records, None, 0, "english_random_response")
    assert first == again
    assert all(r["response"] in words() for r in first)
    assert len({r["response"] for r in first}) > 1


def test_key_length_mismatch_is_warned(caplog):
    records = [{"key": "k", "response": "r", "key_length": 32}]
    warn_on_key_length_mismatch(records, 16)
    assert "32 key tokens" in caplog.text
    caplog.clear()
    warn_on_key_length_mismatch(records, 32)
    assert caplog.text == ""


def test_a_fingerprints_file_other_than_the_runs_is_used_with_a_warning(tmp_path, caplog):
    """--run with a different --fingerprints_file_path checks the given file, and says so."""
    own, other = tmp_path / "own.json", tmp_path / "other.json"
    own.write_text(json.dumps([{"key": "own key", "response": " a"}]))
    other.write_text(json.dumps([{"key": "other key", "response": " b"}]))
    run = SimpleNamespace(fingerprints_file=own, directory=tmp_path, config=None)
    with caplog.at_level(logging.WARNING):
        fingerprints, _, used = selected_fingerprints(FingerprintSelection(), str(other), run)
    assert used == str(other) and fingerprints[0]["key"] == "other key"
    assert f"is not the fingerprints of --run {tmp_path}; checking the given file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert selected_fingerprints(FingerprintSelection(), str(own), run).file == str(own)
    assert "is not the fingerprints" not in caplog.text


def test_the_strategy_is_read_from_records_that_say_it():
    """Perinucleus records say their strategy (they carry their responses' rank): it is inferred, so a run
    labelled by the flag and one without it are the same run; a flag that contradicts them is refused."""
    perinucleus = [{"key": "some key", "response": " a", "response_rank": {"raw": 4}, "key_length": 16}]
    inferred = FingerprintSelection().resolved(perinucleus)
    assert inferred.fingerprint_generation_strategy == "inverse_nucleus"
    assert FingerprintSelection(fingerprint_generation_strategy="inverse_nucleus").resolved(perinucleus) == inferred
    with pytest.raises(OMLError, match="--fingerprint_generation_strategy english contradicts the fingerprints, which are "
                                       "inverse_nucleus fingerprints"):
        FingerprintSelection(fingerprint_generation_strategy="english").resolved(perinucleus)
    plain = [{"key": "some key", "response": " a"}]  # English or random words: the records do not say
    assert FingerprintSelection().resolved(plain).fingerprint_generation_strategy == "english"
    assert FingerprintSelection(fingerprint_generation_strategy="random_word").resolved(plain).fingerprint_generation_strategy \
        == "random_word"
