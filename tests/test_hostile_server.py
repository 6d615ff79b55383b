"""Suspects that misbehave. A suspect's server is run by the party accused, so it may be broken,
slow or hostile: whatever it does, a check ends with a correct result or with one `error:` line
and exit code 2, never a traceback, never a hang, never the API key in what it prints or saves.

One stand-in server on 127.0.0.1 misbehaves in the way the model name asked for says (BEHAVIOURS);
each case runs check_fingerprints.py as users do."""
import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oml import OMLError
from oml.checking import Query
from oml.remote import ApiConfig, ApiRequest, BadAnswer, answer, check_over_api, shown_url, top_logprobs
from tests.conftest import ROOT, random_word_fingerprints, run_script

SECRET = "sk-hostile-SECRET-0042"
FINGERPRINTS = random_word_fingerprints(8)  # those of the `fingerprint_file` fixture: the server answers them


def expected_response(body: dict) -> str:
    """The response of the fingerprint whose key the request holds (raw: in the prompt; chat: the user message)."""
    asked = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
    return next((f["response"] for f in FINGERPRINTS if f["key"].strip() in asked), " nothing")


def completion(body: dict, text, logprobs=None, model: str | None = None) -> dict:
    """An OpenAI-shaped reply to `body` (raw or chat) with `text` and the given log-probabilities."""
    if "messages" in body:
        choice = {"index": 0, "finish_reason": "length", "logprobs": logprobs,
                  "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "finish_reason": "length", "text": text, "logprobs": logprobs}
    return {"id": "x", "object": "completion", "created": 0, "model": model or body["model"], "choices": [choice]}


def raw_logprobs(text: str, logprob: float) -> dict:
    return {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": [{text: logprob, " other": -3.0}], "text_offset": [0]}


class Hostile(BaseHTTPRequestHandler):
    """Answers every key with its response, misbehaving as the model name asked for says."""

    def do_POST(self):  # noqa: N802 - the name http.server calls
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.seen.append(body)
            count = len(self.server.seen)
        response = expected_response(body)
        behaviour = body["model"]
        if behaviour == "honest":
            return self.send_json(200, completion(body, response, raw_logprobs(response, -0.5) if "prompt" in body else None))
        if behaviour == "not_json":
            return self.send_bytes(200, "application/json", b"<html>oops</html>")
        if behaviour == "text_plain":
            return self.send_bytes(200, "text/plain", b"hello there")
        if behaviour == "choices_empty":
            return self.send_json(200, {**completion(body, response), "choices": []})
        if behaviour == "choices_missing":
            return self.send_json(200, {"id": "x", "model": "choices_missing"})
        if behaviour == "choices_null":
            return self.send_json(200, {**completion(body, response), "choices": None})
        if behaviour == "choice_without_fields":
            return self.send_json(200, {**completion(body, response), "choices": [{}]})
        if behaviour == "text_number":
            return self.send_json(200, completion(body, 42))
        if behaviour == "redirect_loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if behaviour == "logprobs_string":
            return self.send_json(200, completion(body, response, "oops"))
        if behaviour == "logprobs_list":
            return self.send_json(200, completion(body, response, [1, 2]))
        if behaviour == "logprob_1000":
            return self.send_json(200, completion(body, response, raw_logprobs(response, 1000.0)))
        if behaviour == "logprob_positive":
            return self.send_json(200, completion(body, response, raw_logprobs(response, 2.0)))
        if behaviour in ("logprobs_refused_400", "logprobs_refused_422"):
            if "logprobs" in body:
                time.sleep(0.3)  # every request of a round is sent with log-probabilities before the first refusal
                return self.send_json(int(behaviour[-3:]), {"error": {"message": "logprobs are not supported"}})
            return self.send_json(200, completion(body, response))
        if behaviour == "other_model":
            return self.send_json(200, completion(body, response, model="gpt-evil-99"))
        if behaviour == "echo_key_all" or (behaviour == "echo_key" and count % 2):
            return self.send_json(404, {"error": {"message": f"no such model; you sent {self.headers.get('Authorization')}"}})
        if behaviour == "echo_key":
            return self.send_json(200, completion(body, f"{self.headers.get('Authorization')} {response}"))
        if behaviour == "ignores_max_tokens":
            return self.send_json(200, completion(body, response + " more" * 1_000_000))
        if behaviour == "refusal":
            reply = completion(body, None)
            reply["choices"][0]["message"]["refusal"] = "I cannot help with that."
            return self.send_json(200, reply)
        if behaviour == "slow_drip":
            return self.drip(json.dumps(completion(body, response)).encode())
        if behaviour == "hang":
            self.server.release.wait(60)
            return None
        return self.send_json(404, {"error": {"message": f"unknown behaviour {behaviour}"}})

    def send_json(self, status: int, payload: dict) -> None:
        self.send_bytes(status, "application/json", json.dumps(payload).encode())

    def send_bytes(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def drip(self, data: bytes) -> None:
        """The whole answer, one byte every half second: no single read ever waits long."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)):
            if self.server.release.wait(0.5):
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile():
    """The server's base URL; its requests are in `.seen` of the returned server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.seen, server.lock, server.release = [], threading.Lock(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def check(server, behaviour: str, tiny_model, fingerprint_file, tmp_path, *extra, env: dict | None = None,
          api_base: str | None = None) -> tuple[subprocess.CompletedProcess, dict | None, str]:
    """check_fingerprints.py against the stand-in asking for `behaviour`: the finished process, the
    report (None if none was written) and everything it printed and saved, which never holds the
    secret or a traceback."""
    args = ["--api_base", api_base if api_base is not None else url_of(server), "--api_model", behaviour,
            "--tokenizer", tiny_model, "--fingerprints_file_path", fingerprint_file, "--null_model", "none",
            "--query_format", "raw", "--api_timeout", "5", "--api_retries", "0", "--output_json", "report.json", *extra]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"OPENAI_API_KEY": SECRET, **(env or {})}.items():
            patch.setenv(name, value)
        result = run_script("check_fingerprints.py", *args, cwd=tmp_path, check=False, timeout=90)
    report_file = tmp_path / "report.json"
    saved = report_file.read_text() if report_file.exists() else ""
    everything = result.stdout + result.stderr + saved
    assert SECRET not in everything and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, json.loads(saved) if saved else None, everything


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    assert message in errors[0], errors[0]


# Answers the checker cannot read, and servers it cannot reach as asked: one line, exit 2.
UNREADABLE = [
    ("not_json", "malformed answer: the body is not JSON"),
    ("text_plain", "malformed answer: the body is not JSON"),
    ("choices_empty", "malformed answer: no choices"),
    ("choices_missing", "malformed answer: no choices"),
    ("choices_null", "malformed answer: no choices"),
    ("choice_without_fields", "malformed answer: a choice without text"),
    ("text_number", "malformed answer: the text is not a string but int"),
    ("redirect_loop", "HTTP 302: redirects to /v1/completions"),
    ("echo_key_all", "HTTP 404: no such model; you sent Bearer ***"),
]


@pytest.mark.slow
@pytest.mark.parametrize("behaviour, message", UNREADABLE)
def test_an_unreadable_answer_is_one_line_and_exit_2(hostile, behaviour, message, tiny_model, fingerprint_file, tmp_path):
    result, report, _ = check(hostile, behaviour, tiny_model, fingerprint_file, tmp_path)
    assert_one_line_error(result, message)
    assert report is None


def matched_every_key(report: dict) -> bool:
    return report["verdict"] == "MATCH" and all(k["match"] for k in report["keys"]) and not report["formats"][0]["errors"]


@pytest.mark.slow
@pytest.mark.parametrize("behaviour", ["honest", "logprobs_string", "logprobs_list", "logprob_1000", "logprob_positive"])
def test_log_probabilities_are_used_only_when_they_are_log_probabilities(hostile, behaviour, tiny_model, fingerprint_file,
                                                                         tmp_path):
    result, report, _ = check(hostile, behaviour, tiny_model, fingerprint_file, tmp_path)
    assert result.returncode == 0 and matched_every_key(report), result.stderr[-3000:]
    probabilities = {k["response_probability"] for k in report["keys"]}
    if behaviour == "honest":  # the server's top token is the whole response: the first token only where it is one
        assert probabilities - {None} and all(p is None or abs(p - 0.6065) < 1e-3 for p in probabilities)
        assert {k["response_rank"] for k in report["keys"]} == {1, None}
        assert "HTTP Request" not in result.stderr  # the HTTP library's per-request log is quiet
    else:
        assert probabilities == {None}
    assert result.stderr.count("sent malformed log-probabilities") == (behaviour != "honest")


@pytest.mark.slow
@pytest.mark.parametrize("status", ["400", "422"])
def test_a_server_that_refuses_log_probabilities_is_asked_without_them(hostile, status, tiny_model, fingerprint_file,
                                                                       tmp_path):
    """Every request of a round is in flight, with log-probabilities, when the first refusal comes back."""
    result, report, _ = check(hostile, f"logprobs_refused_{status}", tiny_model, fingerprint_file, tmp_path, "--check_all_keys")
    assert result.returncode == 0, result.stderr[-3000:]
    assert matched_every_key(report) and len(report["keys"]) == 8
    assert sum("logprobs" in body for body in hostile.seen) >= 2 and "does not take log-probability requests" in result.stderr


@pytest.mark.slow
def test_a_server_answering_as_another_model_is_warned_about_once_and_recorded(hostile, tiny_model, fingerprint_file, tmp_path):
    result, report, _ = check(hostile, "other_model", tiny_model, fingerprint_file, tmp_path)
    assert result.returncode == 0 and matched_every_key(report), result.stderr[-3000:]
    assert result.stderr.count("answered as model 'gpt-evil-99', not the 'other_model' asked for") == 1
    assert report["served_models"] == ["gpt-evil-99"] and {k["served_model"] for k in report["keys"]} == {"gpt-evil-99"}


@pytest.mark.slow
def test_an_echoed_api_key_is_masked_everywhere(hostile, tiny_model, fingerprint_file, tmp_path):
    """Half the requests get an error that echoes the Authorization header, the others a reply that does."""
    result, report, everything = check(hostile, "echo_key", tiny_model, fingerprint_file, tmp_path, "--verbose_eval",
                                       "--check_all_keys")
    assert result.returncode == 0 and "Bearer ***" in everything, result.stderr[-3000:]
    errors = [k for k in report["keys"] if k["error"]]
    assert len(errors) == 4 and all(k["error"].startswith("HTTP 404") for k in errors)
    assert result.stdout.count("ERROR [") == 4 and result.stdout.count("MISS [") == 4  # failed requests are no misses
    assert "4 of 8 requests failed" in result.stderr


@pytest.mark.slow
def test_a_reply_that_ignores_max_tokens_is_cut_in_the_report(hostile, tiny_model, fingerprint_file, tmp_path):
    result, report, _ = check(hostile, "ignores_max_tokens", tiny_model, fingerprint_file, tmp_path)
    assert result.returncode == 0 and matched_every_key(report), result.stderr[-3000:]
    assert all(len(k["predicted"]) == 1000 and k["predicted_cut"] for k in report["keys"])
    assert (tmp_path / "report.json").stat().st_size < 200_000


@pytest.mark.slow
def test_refusals_are_counted_apart_and_never_match(hostile, tiny_model, fingerprint_file, tmp_path):
    result, report, _ = check(hostile, "refusal", tiny_model, fingerprint_file, tmp_path, "--query_format", "chat")
    assert result.returncode == 0, result.stderr[-3000:]
    keys = report["keys"]
    assert keys and all(k["refused"] and k["match"] is False and k["error"] is None for k in keys)
    assert report["formats"][0]["refused"] == len(keys) and report["verdict"] == "NO MATCH"
    assert f"{len(keys)} refused" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("behaviour, timeout", [("slow_drip", "2"), ("hang", "1")])
def test_api_timeout_bounds_each_whole_request(hostile, behaviour, timeout, tiny_model, fingerprint_file, tmp_path):
    """A server that sends a byte every half second never lets one read wait long; the deadline is per request."""
    start = time.time()
    result, _, _ = check(hostile, behaviour, tiny_model, fingerprint_file, tmp_path, "--api_timeout", timeout,
                         "--api_retries", "2")
    assert_one_line_error(result, f"(no complete answer within {timeout} s); is the server overloaded")
    assert "connection failed" not in result.stderr
    assert time.time() - start < 60  # start-up included; the requests themselves take `timeout` seconds


# Inputs refused before any request, without showing the secret they may hold.
REFUSED_INPUTS = [
    ({"api_base": "http://[::1"}, [], {}, "is not a valid URL"),
    ({"api_base": ""}, [], {}, "is not an http(s) URL with a host"),
    ({}, ["--api_key_env", SECRET], {}, "not the key itself"),
    ({}, [], {"OPENAI_API_KEY": "sk-é-" + SECRET}, "that an HTTP header cannot carry"),
]


@pytest.mark.slow
@pytest.mark.parametrize("base, extra, env, message", REFUSED_INPUTS)
def test_bad_urls_and_keys_are_one_line_and_never_shown(hostile, base, extra, env, message, tiny_model, fingerprint_file,
                                                       tmp_path):
    result, _, _ = check(hostile, "honest", tiny_model, fingerprint_file, tmp_path, *extra, env=env, **base)
    assert_one_line_error(result, message)
    assert not hostile.seen


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--tokenizer", "--api_model"])
def test_api_flags_with_a_local_suspect_are_refused(flag, tiny_model, fingerprint_file, tmp_path):
    result = run_script("check_fingerprints.py", "--model_path", tiny_model, "--fingerprints_file_path", fingerprint_file,
                        flag, tiny_model, cwd=tmp_path, check=False, timeout=90)
    assert_one_line_error(result, f"{flag} is for --api_base suspects")


@pytest.mark.slow
def test_credentials_in_the_url_are_never_shown(hostile, tiny_model, fingerprint_file, tmp_path):
    password = "pw-" + SECRET[::-1]
    url = url_of(hostile).replace("//", f"//user:{password}@")
    result, report, everything = check(hostile, "honest", tiny_model, fingerprint_file, tmp_path, api_base=url)
    assert result.returncode == 0 and matched_every_key(report), result.stderr[-3000:]
    assert password not in everything and report["model"] == f"{shown_url(url)} (honest)"
    assert report["model"].startswith("http://***@127.0.0.1:")


@pytest.mark.slow
def test_ctrl_c_cancels_the_requests_in_flight_and_saves_a_partial_report(hostile, tiny_model, fingerprint_file, tmp_path):
    command = [sys.executable, str(ROOT / "check_fingerprints.py"), "--api_base", url_of(hostile), "--api_model", "hang",
               "--tokenizer", str(tiny_model), "--fingerprints_file_path", str(fingerprint_file), "--null_model", "none",
               "--query_format", "raw", "--output_json", "report.json"]
    check_run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 # a suite started in the background (`cmd &` in a script) inherits SIGINT ignored
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not hostile.seen and check_run.poll() is None:
            time.sleep(0.1)
        assert hostile.seen, "no request reached the server"
        time.sleep(0.5)  # every request of the first round is in flight
        interrupted = time.time()
        check_run.send_signal(signal.SIGINT)
        out, err = check_run.communicate(timeout=30)
        took = time.time() - interrupted
    finally:
        check_run.kill()
    assert check_run.returncode == 130 and took < 5, (took, err[-3000:])
    assert err.rstrip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert "Check interrupted: the results above are partial (0 of 4 requests answered)" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["partial"] is True and len(report["keys"]) == 4
    assert all(k["error"] == "not answered: the check was interrupted" for k in report["keys"])


# In-process: the parsing of answers, and a check started where an event loop already runs.

def test_answers_are_read_as_the_api_describes_them_or_refused():
    top = {" yes": -0.1, " no": -2.5}
    raw = {"choices": [{"text": " yes", "logprobs": {"top_logprobs": [top]}}]}
    assert answer(raw, "raw") == (" yes", False, list(top.items()))
    chat = {"choices": [{"message": {"content": None, "refusal": "No."},
                         "logprobs": {"content": [{"top_logprobs": [{"token": " a", "logprob": 0.0}]}]}}]}
    assert answer(chat, "chat") == ("", True, [(" a", 0.0)])
    assert top_logprobs(None, "raw") == [] and top_logprobs({"content": None}, "chat") == []
    for malformed in ("oops", [1, 2], {"top_logprobs": ["x"]}, {"top_logprobs": [{" a": 0.5}]},
                      {"top_logprobs": [{" a": float("nan")}]}, {"top_logprobs": [{" a": True}]}):
        assert top_logprobs(malformed, "raw") is None, malformed
    assert top_logprobs({"top_logprobs": [{" a": float("-inf")}]}, "raw") == [(" a", float("-inf"))]
    for unreadable, key_format in (({"choices": [{}]}, "chat"), ({"choices": [{"message": {}}]}, "chat"),
                                   ({"choices": ["text"]}, "raw"), ({"choices": [{"text": [" yes"]}]}, "raw")):
        with pytest.raises(BadAnswer):
            answer(unreadable, key_format)


def raw_requests() -> list[ApiRequest]:
    return [ApiRequest(i, Query("raw"), 0, f["key"], f["response"], 1, f["response"]) for i, f in enumerate(FINGERPRINTS)]


def test_a_check_from_inside_a_running_event_loop_gets_a_loop_of_its_own(hostile, monkeypatch):
    """As from a notebook, where an event loop already runs."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    async def from_a_notebook():
        return check_over_api(ApiConfig(api_base=url_of(hostile), api_model="honest"), raw_requests())

    results = asyncio.run(from_a_notebook())
    assert [r.match for r in results] == [True] * 8 and results[0].served_model == "honest"


def test_a_server_that_is_down_is_not_reported_as_slow():
    """The time runs out while retries wait: the failure they waited out is what is reported."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(OMLError, match=r"\(connection failed \(.+\)\); is the server running"):
        check_over_api(ApiConfig(api_base=f"http://127.0.0.1:{port}", api_model="m", api_timeout=1), raw_requests()[:2])


def test_bad_urls_and_key_variables_are_refused_in_python_too():
    with pytest.raises(OMLError, match="not the key itself"):
        ApiConfig(api_base="http://localhost:8000", api_model="m", api_key_env="sk-" + SECRET)
    with pytest.raises(OMLError, match="not a valid URL"):
        ApiConfig(api_base="http://[::1", api_model="m")
    assert shown_url("https://u:p@ss@host:1/v1") == "https://***@host:1/v1"
