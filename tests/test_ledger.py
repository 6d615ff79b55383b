"""The ledger of revealed keys: atomic reservations across processes, committed order, clear errors."""
import json
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from oml import OMLError
from oml.ledger import FIELDS, entries, ledger_path, record_contexts, remaining, reserve, revealed, revealed_contexts

ROOT = Path(__file__).resolve().parent.parent

# Each process waits for the go file, so that both reserve at the same time, then reserves one key at a time.
RESERVER = """
import os, sys, time, uuid
from oml.ledger import reserve
run_dir, go, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
check = uuid.uuid4().hex
while not os.path.exists(go):
    time.sleep(0.001)
for _ in range(rounds):
    assert len(reserve(run_dir, 1, "http://localhost:8000 tiny", ["plain"], check, range(400))) == 1
"""


def test_two_processes_reserve_distinct_keys(tmp_path):
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", RESERVER, str(tmp_path), str(go), "150"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    go.touch()
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
    lines = ledger_path(tmp_path).read_text().splitlines()
    assert len(lines) == 300
    parsed = [json.loads(line) for line in lines]
    positions = [p for entry in parsed for p in entry["positions"]]
    assert len(positions) == len(set(positions)) == 300
    assert sorted(positions) == list(range(300))
    assert len({entry["check"] for entry in parsed}) == 2
    for check in {entry["check"] for entry in parsed}:  # each check's keys come in committed order
        own = [entry["positions"][0] for entry in parsed if entry["check"] == check]
        assert own == sorted(own) and len(own) == 150
    assert remaining(tmp_path, range(400)) == 100


def test_reserve_skips_revealed_keys_in_committed_order(tmp_path):
    assert reserve(tmp_path, 3, "model-a", ["plain"], "c1", range(10)) == [0, 1, 2]
    assert reserve(tmp_path, 2, "model-b", ["plain"], "c2", range(10)) == [3, 4]
    assert revealed(tmp_path) == {0, 1, 2, 3, 4}
    # Positions revealed out of order (a reused re-check beyond them) are still skipped.
    reserve(tmp_path, 7, "model-a", ["plain"], "c3", range(10), reuse=True)
    assert reserve(tmp_path, 2, "model-a", ["plain"], "c4", range(10)) == [7, 8]


def test_reuse_starts_from_zero_and_still_records(tmp_path):
    reserve(tmp_path, 4, "model", ["plain"], "c1", range(10))
    assert reserve(tmp_path, 2, "model", ["chat"], "c2", range(10), reuse=True) == [0, 1]
    assert len(entries(tmp_path)) == 2
    assert entries(tmp_path)[1]["positions"] == [0, 1] and entries(tmp_path)[1]["formats"] == ["chat"]
    assert reserve(tmp_path, 20, "model", ["chat"], "c3", range(10), reuse=True) == list(range(10))


def test_remaining_counts_down_and_runs_out(tmp_path):
    assert remaining(tmp_path, range(5)) == 5  # no ledger yet: nothing revealed
    assert revealed(tmp_path) == set() and entries(tmp_path) == []
    reserve(tmp_path, 2, "model", ["plain"], "c1", range(5))
    assert remaining(tmp_path, range(5)) == 3
    assert reserve(tmp_path, 10, "model", ["plain"], "c2", range(5)) == [2, 3, 4]
    assert remaining(tmp_path, range(5)) == 0
    assert reserve(tmp_path, 1, "model", ["plain"], "c3", range(5)) == []
    assert len(entries(tmp_path)) == 2  # an empty reservation records nothing


def test_entries_hold_only_the_listed_fields(tmp_path):
    check = uuid.uuid4().hex
    reserve(tmp_path, 2, "http://host:8000 some-model", ["plain", "chat"], check, range(3))
    reserve(tmp_path, 1, "/models/suspect", ["plain"], check, range(3))
    for entry in entries(tmp_path):
        assert tuple(entry) == FIELDS
        assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0
        assert entry["check"] == check
    assert [entry["suspect"] for entry in entries(tmp_path)] == ["http://host:8000 some-model", "/models/suspect"]


def test_malformed_line_is_a_clear_error(tmp_path):
    reserve(tmp_path, 1, "model", ["plain"], "c1", range(5))
    with open(ledger_path(tmp_path), "a") as f:
        f.write("{not json\n")
    for call in (lambda: entries(tmp_path), lambda: revealed(tmp_path), lambda: remaining(tmp_path, range(5)),
                 lambda: reserve(tmp_path, 1, "model", ["plain"], "c2", range(5))):
        with pytest.raises(OMLError, match=r"revealed\.jsonl, line 2: malformed") as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("line", ['[1, 2]', '{"time": "t", "suspect": "s", "formats": [], "check": "c"}',
                                  '{"time": "t", "suspect": "s", "positions": [-1], "formats": [], "check": "c"}',
                                  '{"time": "t", "suspect": "s", "positions": ["0"], "formats": [], "check": "c"}',
                                  '{"time": "t", "suspect": "s", "positions": [], "formats": [], "check": "c", "contexts": [5]}'])
def test_wrong_entries_are_errors(tmp_path, line):
    ledger_path(tmp_path).write_text(line + "\n")
    with pytest.raises(OMLError, match="line 1: malformed"):
        entries(tmp_path)


def test_revealed_watermark_contexts_are_recorded_beside_asked_prompts(tmp_path):
    """A domain watermark check: its prompts reserved like keys, its bundle's contexts recorded after."""
    assert reserve(tmp_path, 8, "model", ["chat"], "c1", range(100)) == list(range(8))
    record_contexts(tmp_path, "model", "c1", [(5,), (7,)])
    record_contexts(tmp_path, "model", "c2", [[7], [9]])
    assert revealed_contexts(tmp_path) == {(5,), (7,), (9,)} and revealed(tmp_path) == set(range(8))
    assert reserve(tmp_path, 8, "model", ["chat"], "c2", range(100)) == list(range(8, 16))
    assert [tuple(e) for e in entries(tmp_path)][1] == (*FIELDS, "contexts")


def test_ledger_is_only_appended(tmp_path):
    reserve(tmp_path, 1, "model", ["plain"], "c1", range(5))
    before = ledger_path(tmp_path).read_bytes()
    reserve(tmp_path, 1, "model", ["plain"], "c2", range(5))
    assert ledger_path(tmp_path).read_bytes().startswith(before)


def test_unterminated_last_line_is_not_swallowed(tmp_path):
    reserve(tmp_path, 1, "model", ["plain"], "c1", range(5))
    path = ledger_path(tmp_path)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert reserve(tmp_path, 1, "model", ["plain"], "c2", range(5)) == [1]
    assert [entry["positions"] for entry in entries(tmp_path)] == [[0], [1]]


def test_missing_run_folder_is_an_error(tmp_path):
    with pytest.raises(OMLError, match="run folder not found"):
        reserve(tmp_path / "absent", 1, "model", ["plain"], "c1", range(5))
