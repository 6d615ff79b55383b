"""Suspects behind an OpenAI-compatible API: a real `transformers serve` on 127.0.0.1, and a small
stand-in server for what that one cannot show (refused keys, log-probabilities, retries)."""
import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from oml import OMLError
from oml.checking import Query
from oml.remote import ApiConfig, ApiRequest, api_requests, check_over_api
from oml.tokenization import cut_fingerprint
from tests.conftest import run_script, transformers_serve

SECRET = "sk-test-SECRET-123"


@pytest.fixture(scope="module")
def served_model(fingerprinted_tiny_model):
    """`transformers serve` pinned to the fingerprinted tiny model; stopped by its PID afterwards."""
    model_dir, fingerprints = fingerprinted_tiny_model
    with transformers_serve(model_dir) as url:
        yield url, str(model_dir), fingerprints


def per_key(report: dict) -> list[tuple]:
    return [(k["index"], k["format"], k["match"], k["predicted"]) for k in report["keys"]]


@pytest.mark.slow
@pytest.mark.server
def test_api_results_equal_the_local_checkers_raw_and_chat(served_model, tmp_path):
    url, model_dir, fingerprints = served_model
    common = ["--fingerprints_file_path", fingerprints, "--fingerprint_generation_strategy", "random_word", "--null_model", "none",
              "--query_format", "both", "--alpha", "0.01", "--check_all_keys"]
    run_script("check_fingerprints.py", "--model_path", model_dir, *common, "--output_json", "local.json", cwd=tmp_path)
    api = run_script("check_fingerprints.py", "--api_base", url, "--api_model", model_dir, "--tokenizer", model_dir, *common,
                     "--output_json", "api.json", cwd=tmp_path)
    local, remote = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "api.json"))
    assert per_key(remote) == per_key(local) and len(per_key(local)) == 16
    assert [(e["format"], e["matches"]) for e in remote["formats"]] == [("raw", 8), ("chat", 8)]
    assert remote["verdict"] == local["verdict"] == "MATCH" and api.stdout.strip().endswith("Fingerprint accuracy: 100.00")


@pytest.mark.server
def test_a_sequential_api_check_reveals_few_keys_and_agrees_with_the_local_check(served_model, tmp_path, tiny_model):
    """The default for API suspects: keys in rounds until the verdict, recorded in the run's ledger
    before they are sent, with an evidence bundle that verifies; the same verdict and per-key
    results as the local check of the same keys."""
    url, model_dir, _ = served_model
    run = tmp_path / "run"
    shutil.copytree(Path(model_dir).parent, run, ignore=shutil.ignore_patterns("revealed.jsonl*"))
    common = ["--run", run, "--alpha", "0.01", "--round_size", "2"]
    run_script("check_fingerprints.py", "--model_path", model_dir, *common, "--output_json", "local.json", cwd=tmp_path)
    api = run_script("check_fingerprints.py", "--api_base", url, "--api_model", model_dir, *common, "--output_json", "api.json",
                     "--evidence", "bundle.json", cwd=tmp_path)
    local, remote = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "api.json"))
    asked = {k["index"] for k in remote["keys"]}
    assert remote["sequential"]["decision"] == remote["verdict"] == local["verdict"] == "MATCH"
    assert len(asked) == remote["sequential"]["keys_used"] < 8 and "Sequential check:" in api.stdout
    assert per_key(remote) == [k for k in per_key(local) if k[0] in asked]
    ledger = [json.loads(line) for line in (run / "revealed.jsonl").read_text().splitlines()]
    assert sorted(p for entry in ledger for p in entry["positions"]) == sorted(asked) == remote["revealed"]["positions"]
    assert all(entry["suspect"] == f"{url} ({model_dir})" for entry in ledger)
    root = json.loads((run / "commitment.json").read_text())["root"]
    verified = run_script("verify_evidence.py", tmp_path / "bundle.json", "--root", root, "--count", "8", "--alpha", "0.01",
                          "--round_size", "2", "--null_model", tiny_model, "--api_base", url, "--api_model", model_dir, cwd=tmp_path)
    assert "Evidence verified: MATCH" in verified.stdout
    asked_per_format = f"{len(asked)}/{len(asked)}"
    assert f"Live suspect now: raw {asked_per_format}, chat {asked_per_format}; 0 of" in verified.stdout
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert bundle["suspect"] == {"kind": "api", "endpoint": url + "/v1", "model": str(model_dir)}
    assert all(q["request"]["temperature"] == 0.0 for q in bundle["queries"])


@pytest.mark.slow
def test_a_server_that_is_down_is_one_line_and_exit_2(tmp_path, fingerprint_file, tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    start = time.time()
    result = run_script("check_fingerprints.py", "--api_base", f"http://127.0.0.1:{port}/v1", "--api_model", "m", "--tokenizer",
                        tiny_model, "--fingerprints_file_path", fingerprint_file, "--null_model", "none", "--query_format", "raw",
                        "--api_timeout", "2", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no answer from http://127.0.0.1:{port}/v1")
    assert time.time() - start < 90


class StandIn(BaseHTTPRequestHandler):
    """An OpenAI-shaped server: answers `reply` with top log-probabilities, fails the first
    `failures` requests with `failure_status`, and wants `SECRET` as its key."""
    reply = " sho"
    failures = 0
    failure_status = 503
    seen_keys: list[str] = []

    def do_POST(self):  # noqa: N802 - the name http.server calls
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.seen_keys.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {SECRET}":
            return self.send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        if StandIn.failures > 0:
            StandIn.failures -= 1
            return self.send(StandIn.failure_status, {"error": {"message": "busy"}})
        top = {StandIn.reply: -0.5, " other": -1.5, " third": -2.5}
        if self.path.endswith("/chat/completions"):
            logprobs = {"content": [{"token": StandIn.reply, "logprob": -0.5, "bytes": None,
                                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]}]}
            choice = {"index": 0, "finish_reason": "length", "logprobs": logprobs if body.get("logprobs") else None,
                      "message": {"role": "assistant", "content": StandIn.reply}}
            return self.send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]})
        choice = {"index": 0, "finish_reason": "length", "text": StandIn.reply,
                  "logprobs": {"tokens": [StandIn.reply], "token_logprobs": [-0.5], "top_logprobs": [top], "text_offset": [0]}}
        return self.send(200, {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]})

    def send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StandIn.failures, StandIn.seen_keys = 0, []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def queries(key_format: str, response: str = " sho", first: str = " sho") -> list[ApiRequest]:
    return [ApiRequest(i, Query(key_format), 0, f"key {i}", response, 1, first) for i in range(3)]


def server(url: str, concurrency: int = 8) -> ApiConfig:
    return ApiConfig(api_base=url, api_model="m", api_concurrency=concurrency)


@pytest.mark.slow
def test_a_wrong_api_key_is_a_clear_error_that_never_shows_the_key(stand_in, tmp_path, fingerprint_file, tiny_model, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-wrong-" + SECRET[::-1])
    result = run_script("check_fingerprints.py", "--api_base", stand_in, "--api_model", "m", "--api_key_env", "MY_KEY",
                        "--tokenizer", tiny_model, "--fingerprints_file_path", fingerprint_file, "--null_model", "none",
                        "--query_format", "raw", "--output_json", "r.json", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "refused the API key (HTTP 401)" in result.stderr and "MY_KEY" in result.stderr
    assert SECRET[::-1] not in result.stdout + result.stderr and not (tmp_path / "r.json").exists()


def test_log_probabilities_give_rank_and_probability_and_the_key_stays_secret(stand_in, monkeypatch, caplog, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for key_format in ("raw", "chat"):
        results = check_over_api(server(stand_in), queries(key_format))
        assert all(r.match and r.response_rank == 1 and abs(r.response_probability - 0.6065) < 1e-3 for r in results)
    other = check_over_api(server(stand_in), queries("chat", response=" third", first=" third"))
    assert [(r.match, r.response_rank) for r in other] == [(False, 3)] * 3
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err and StandIn.seen_keys[0] == f"Bearer {SECRET}"


def test_retries_on_busy_servers_and_failures_are_errors_not_misses(stand_in, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    StandIn.failures = 2  # two 503s, then answers: the client's retries get through
    assert all(r.match for r in check_over_api(server(stand_in, 1), queries("raw")))
    StandIn.failures, StandIn.failure_status = 4, 500  # the first query fails all its tries (1 + 3 retries)
    results = check_over_api(server(stand_in, 1), queries("raw"), retries=3)
    assert results[0].match is None and results[0].error.startswith("HTTP 500") and all(r.match for r in results[1:])
    StandIn.failures = 100
    with pytest.raises(OMLError, match="no answer from"):
        check_over_api(server(stand_in), queries("raw"), retries=0)


def test_a_server_that_answers_another_accepted_response_matches(stand_in, monkeypatch, tokenizer):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    key_ids, response_ids = cut_fingerprint(tokenizer, "a key", " third", 16, 1, other_responses=[" sho", " zebra"])
    asked = api_requests(tokenizer, [(key_ids, response_ids)], [Query("chat")])
    assert (asked[0].response, asked[0].others, asked[0].first_token) == (" third", (" sho", " zebra"), " third")
    assert [(r.match, r.response_rank) for r in check_over_api(server(stand_in), asked)] == [(True, 3)]  # rank: of the response
    alone = api_requests(tokenizer, [cut_fingerprint(tokenizer, "a key", " third", 16, 1)], [Query("chat")])
    assert [r.match for r in check_over_api(server(stand_in), alone)] == [False]
