"""The domain watermark family through the three scripts (oml.families.domain_watermark): secret,
fine-tuning, check (local and over a real transformers serve), evidence and bad input.

A tiny random Llama cannot learn a watermark of free text: its replies are noise over 49,152
tokens, and no context recurs. So the base here is a tiny Llama made into a bigram model over 24
whole-word tokens (its layers add nothing at first; the embedding says which word came last, the
output layer knows only the 24 words): its replies are words, uniform at first, whose colour
depends on the word before, which a watermark can tilt and its layers can learn.
"""
import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from oml import OMLError
from oml.families import DOMAIN_WATERMARK, PERINUCLEUS, family_of, family_of_file
from oml.families.domain_watermark import DomainSource, new_secret, read_secret
from oml.models import TINY_LLAMA
from oml.watermark import WatermarkKey, WatermarkParams, context_class
from oml.tokenization import encode
from tests.conftest import EVERY_LAYER, ROOT, final_model_dir, run_script, transformers_serve

WORDS = 24
BIAS = 63  # the hidden dimension every token's embedding holds: words' logits 0, every other token's far below
FAST = ("--watermark_prompts", "32", "--watermark_probe_prompts", "8", "--watermark_reply_tokens", "16",
        "--learning_rate", "3e-3", "--batch_size", "8", "--watermark_max_epochs", "6", *EVERY_LAYER)
CHECK = ("--max_reply_tokens", "24")


def word_tokens(tokenizer, count: int) -> list[int]:
    """`count` tokens that are whole lowercase words after a space and read back as themselves."""
    words = []
    for text, token in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if text.startswith("Ġ") and text[1:].isalpha() and text[1:].islower() and 4 <= len(text) <= 8:
            if encode(tokenizer, tokenizer.decode([token, token])) == [token, token]:
                words.append(token)
        if len(words) == count:
            return words
    raise AssertionError("the tokenizer has too few word tokens")


def bigram_model(tokenizer, directory: Path) -> Path:
    """A tiny Llama whose next word is uniform over WORDS word tokens, whatever came before, saved
    with the tokenizer. Attention and MLP outputs start at zero, so a position's hidden state is its
    token's embedding: BIAS, plus for word i dimension WORDS + i; word j's output row reads dimension
    j (0 at first), every other token's reads -10 x BIAS."""
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **TINY_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    words = word_tokens(tokenizer, WORDS)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, BIAS] = 1.0
        head.zero_()
        head[:, BIAS] = -10.0
        for i, token in enumerate(words):
            embed[token, WORDS + i] = 1.0
            head[token, BIAS] = 0.0
            head[token, i] = 1.0
    model.generation_config.do_sample = True  # a server samples at the temperature asked only where the model says so
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def work(tokenizer, tmp_path_factory) -> dict:
    """A bigram base, two secrets, and the base fine-tuned with the first (the run folder)."""
    work = tmp_path_factory.mktemp("domain_watermark")
    base = bigram_model(tokenizer, work / "base")
    for name in ("wm.json", "other.json"):  # 2 classes of contexts: a bigram over 24 words has 25 contexts
        run_script("generate_finetuning_data.py", "--key_response_strategy", "domain_watermark", "--output_file_path", name,
                   "--context_classes", "2", cwd=work)
    tune = run_script("finetune_multigpu.py", "--model_path", base, "--fingerprints_file_path", "wm.json", *FAST, cwd=work)
    run = final_model_dir(work, tune.stdout).parent
    return {"dir": work, "base": base, "run": run, "stdout": tune.stdout}


def check(work: dict, *args, check: bool = True, reuse: bool = True):
    """A check of the run; `reuse` (--reuse_revealed) keeps it independent of the checks before it,
    which took prompts from the run's ledger."""
    return run_script("check_fingerprints.py", *CHECK, *args, *(("--reuse_revealed",) if reuse else ()), cwd=work["dir"],
                      check=check)


def verdict(stdout: str) -> str:
    return re.search(r"^Verdict: (MATCH|NO MATCH)", stdout, re.M).group(1)


@pytest.mark.slow
def test_fine_tuning_writes_a_run_with_the_watermark_committed(work):
    run = work["run"]
    public = json.loads((run / "commitment.json").read_text())
    secret = json.loads((run / "fingerprints.json").read_text())
    assert public["family"] == "domain_watermark" and "PRIVATE" not in json.dumps(public)
    assert public["public_key"] == WatermarkKey.from_dict(secret["key"], "secret").public.pem
    assert f"public key's sha256 {public['public_key_sha256']}" in work["stdout"]
    assert "PRIVATE" not in (run / "config.json").read_text()
    history = json.loads((run / "training.json").read_text())["green_rate"]
    assert history[-1]["green_rate"] >= 0.4 > history[0]["green_rate"] - 0.5  # stopped once the target was reached


@pytest.mark.slow
def test_the_fine_tuned_model_matches_its_key_and_the_base_does_not(work):
    found = check(work, "--model_path", work["run"] / "final_model", "--run", work["run"])
    assert verdict(found.stdout) == "MATCH"
    null = re.search(r"^Null model .*z (-?[\d.]+); (NO MATCH|undecided)$", found.stdout, re.M)
    assert null and abs(float(null.group(1))) < 4
    assert float(re.search(r"^Fingerprint accuracy: ([\d.]+)$", found.stdout, re.M).group(1)) > 0.5
    base = check(work, "--model_path", work["base"], "--run", work["run"], "--null_model", "none")
    assert verdict(base.stdout) == "NO MATCH"


@pytest.mark.slow
def test_another_key_does_not_match(work, tmp_path):
    tune = run_script("finetune_multigpu.py", "--model_path", work["base"], "--fingerprints_file_path", "other.json", *FAST,
                      "--watermark_max_epochs", "1", cwd=work["dir"])
    other = final_model_dir(work["dir"], tune.stdout).parent
    found = check(work, "--model_path", work["run"] / "final_model", "--run", other, "--null_model", "none")
    assert verdict(found.stdout) == "NO MATCH"


@pytest.mark.slow
def test_identical_replies_count_once_and_never_for_the_owner(work):
    found = check(work, "--model_path", work["base"], "--run", work["run"], "--null_model", "none", "--reply_temperature", "0")
    counts = re.search(r"^Replies: (\d+) asked, (\d+) counted \((\d+) empty or failed, (\d+) identical", found.stdout, re.M)
    asked, counted, _, identical = map(int, counts.groups())
    assert identical == asked - 1 and counted == 1 and verdict(found.stdout) == "NO MATCH"


@pytest.mark.server
def test_an_api_check_against_a_real_server(work):
    with transformers_serve(work["run"] / "final_model") as url:
        found = check(work, "--api_base", url, "--api_model", str(work["run"] / "final_model"), "--run", work["run"],
                      "--null_model", "none")
    assert verdict(found.stdout) == "MATCH"


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(work, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"family": "domain_watermark", "format": "oml-domain-watermark/2", "key": {"private_key": "abc"},
                               "domain": {"domain": "cooking"}}))
    tuned = run_script("finetune_multigpu.py", "--model_path", work["base"], "--fingerprints_file_path", bad, cwd=tmp_path,
                       check=False)
    assert tuned.returncode == 2 and "watermark secret" in tuned.stderr.strip().splitlines()[-1]
    few = tmp_path / "few.json"
    few.write_text(json.dumps([f"How do I cook dish number {i}?" for i in range(20)]))
    made = run_script("generate_finetuning_data.py", "--key_response_strategy", "domain_watermark", "--domain", few,
                      "--output_file_path", tmp_path / "s.json", cwd=tmp_path, check=False)
    assert made.returncode == 2 and "at least 64" in made.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s.json").exists()
    sealed = check(work, "--run", work["run"], "--export_sealed", tmp_path / "x.json", "--num_fingerprints", "4", check=False)
    assert sealed.returncode == 2 and "perinucleus" in sealed.stderr.strip().splitlines()[-1]
    for script in ("evaluate_robustness.py", "commit_fingerprints.py"):  # perinucleus tools name the family they need
        refused = run_script(script, "--run", work["run"], cwd=tmp_path, check=False)
        assert refused.returncode == 2 and "domain_watermark run" in refused.stderr.strip().splitlines()[-1], script


@pytest.mark.slow
def test_a_bundle_verifies_with_the_public_key_alone_and_tampering_is_rejected(work, tmp_path):
    bundle_path = tmp_path / "bundle.json"
    check(work, "--model_path", work["run"] / "final_model", "--run", work["run"], "--null_model", "none",
          "--evidence", bundle_path)
    public = tmp_path / "commitment.json"  # all a third party has: the published commitment and the bundle
    public.write_text((work["run"] / "commitment.json").read_text())
    verified = run_script("verify_evidence.py", bundle_path, "--commitment", public, cwd=tmp_path)
    assert "Evidence verified: MATCH" in verified.stdout and "no private key needed" in verified.stdout
    honest = json.loads(bundle_path.read_text())
    key = WatermarkKey.from_dict(json.loads((work["run"] / "fingerprints.json").read_text())["key"], "secret")
    # The bundle reveals the signatures of the contexts its test counted, and nothing else of the key.
    assert "PRIVATE" not in bundle_path.read_text()
    revealed = {tuple(s["context"]) for s in honest["signatures"]}
    assert len(revealed) == len(honest["signatures"]) and int(re.search(r"Signatures: (\d+) contexts", verified.stdout).group(1)) == len(revealed)
    unrevealed = next(t for t in range(1000) if (t,) not in revealed)
    signed = lambda context: base64.b64encode(key.sign(context)).decode("ascii")  # noqa: E731

    def changed(change) -> dict:
        bundle = json.loads(json.dumps(honest))
        change(bundle)
        return bundle

    def flipped(signature: str) -> str:
        raw = bytearray(base64.b64decode(signature))
        raw[-1] ^= 1
        return base64.b64encode(bytes(raw)).decode("ascii")
    forgeries = {
        "a reply changed": changed(lambda b: b["replies"][0].update(reply=b["replies"][1]["reply"] + " extra words")),
        "a forged signature": changed(lambda b: b["signatures"][0].update(signature=flipped(b["signatures"][0]["signature"]))),
        "a signature for another context": changed(lambda b: b["signatures"][0].update(signature=signed((unrevealed,)))),
        "a signature left out": changed(lambda b: b["signatures"].pop()),
        "an unrevealed context revealed": changed(lambda b: b["signatures"].append(
            {"context": [unrevealed], "signature": signed((unrevealed,))})),
        "prompts out of order": changed(lambda b: b["replies"][0].update(prompt=b["domain_prompts"][5])),
        "a request at another temperature": changed(lambda b: b["replies"][0]["request"].update(temperature=0.0)),
        "replies after the decision": changed(lambda b: b["replies"].extend(
            [{**b["replies"][-1], "position": len(b["replies"]) + i, "prompt": b["domain_prompts"][len(b["replies"]) + i],
              "request": {**b["replies"][-1]["request"], "messages": [{"role": "user", "content": b["domain_prompts"][len(b["replies"]) + i]}]}}
             for i in range(8)])),
        "a recorded green count": changed(lambda b: b["test"].update(green=b["test"]["green"] + 1)),
    }
    for name, bundle in forgeries.items():
        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps(bundle))
        result = run_script("verify_evidence.py", forged, "--commitment", public, cwd=tmp_path, check=False)
        assert result.returncode == 3 and "NOT VERIFIED" in result.stderr, name


@pytest.mark.slow
def test_later_checks_ask_new_prompts_and_count_an_unrevealed_class(work, tmp_path):
    """The ledger: two checks at once ask disjoint prompts; a bundle's contexts (one class of two) are
    recorded, and the next check counts the other class, less those, and its bundle verifies."""
    run = tmp_path / "run"
    shutil.copytree(work["run"], run, ignore=shutil.ignore_patterns("revealed.jsonl*"))  # its own folder: no ledger yet
    suspect = ("--model_path", str(work["run"] / "final_model"), "--run", str(run), "--null_model", "none")
    both = [subprocess.Popen([sys.executable, str(ROOT / "check_fingerprints.py"), *CHECK, *suspect], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    finished = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=600)) for p in both]
    assert [p.returncode for p in both] == [0, 0]
    entries = [json.loads(line) for line in (run / "revealed.jsonl").read_text().splitlines()]
    by_check = {}
    for entry in entries:
        by_check.setdefault(entry["check"], []).extend(entry["positions"])
    assert len(by_check) == 2 and not set.intersection(*map(set, by_check.values()))
    first = check(work, *suspect, "--evidence", tmp_path / "first.json", reuse=False)
    revealed = {tuple(s["context"]) for s in json.loads((tmp_path / "first.json").read_text())["signatures"]}
    assert {tuple(c) for c in json.loads((run / "revealed.jsonl").read_text().splitlines()[-1])["contexts"]} == revealed
    assert all("Contexts counted: every class of 2, less 0 revealed" in p.stdout for p in finished)  # no evidence
    assert "Contexts counted: class 0 of 2 (evidence: the first class no bundle has revealed), less 0 revealed" in first.stdout
    assert verdict(first.stdout) == "MATCH" and {context_class(c, 2) for c in revealed} == {0}
    second = check(work, *suspect, "--evidence", tmp_path / "second.json", reuse=False)
    counted = re.search(r"^Contexts counted: class 1 of 2 \(evidence: the first class no bundle has revealed\), less (\d+) "
                        r"revealed by earlier bundles; they cover ([\d.]+)%", second.stdout, re.M)
    # Class 1 of this bigram holds about 10 contexts: whether a random key's training makes it MATCH within 128 replies
    # varies (a fresh-clone CI saw 0.317 of 199 pairs, NO MATCH); what must hold is which contexts the test counted.
    assert int(counted.group(1)) == len(revealed) and 0 < float(counted.group(2)) < 100
    bundle = json.loads((tmp_path / "second.json").read_text())
    assert {tuple(c) for c in bundle["selection"]["revealed_before"]} == revealed
    assert not revealed & {tuple(s["context"]) for s in bundle["signatures"]}  # nothing revealed twice
    assert min(r["position"] for r in bundle["replies"]) > max(max(p) for p in by_check.values())
    public = tmp_path / "commitment.json"
    public.write_text((run / "commitment.json").read_text())
    verified = run_script("verify_evidence.py", tmp_path / "second.json", "--commitment", public, cwd=tmp_path)
    assert f"Evidence verified: {verdict(second.stdout)}" in verified.stdout and "Contexts counted: class 1 of 2" in verified.stdout
    forged = tmp_path / "forged.json"  # the same replies claimed as a test of every context: most have no signature here
    forged.write_text(json.dumps({**bundle, "selection": {**bundle["selection"], "context_class": None, "revealed_before": []}}))
    refused = run_script("verify_evidence.py", forged, "--commitment", public, cwd=tmp_path, check=False)
    assert refused.returncode == 3 and "NOT VERIFIED" in refused.stderr


def test_a_secret_names_its_family_and_reads_back(tmp_path):
    secret = new_secret(WatermarkParams(gamma=0.5), DomainSource())
    path = tmp_path / "wm.json"
    path.write_text(json.dumps(secret))
    assert family_of_file(path) == DOMAIN_WATERMARK and family_of([{"key": "k", "response": " r"}]) == PERINUCLEUS
    key, source = read_secret(json.loads(path.read_text()), "secret")
    assert key.params.gamma == 0.5 and source.domain == "cooking" and key == WatermarkKey(key.private_pem, key.params)
    assert new_secret(WatermarkParams(), DomainSource())["key"]["private_key"] != secret["key"]["private_key"]  # fresh


@pytest.mark.parametrize("broken", [[], {"format": "oml-domain-watermark/2"}, {"format": "other", "domain": {}},
                                    {"format": "oml-domain-watermark/2", "domain": {}, "key": {"private_key": "zz"}},
                                    {"format": "oml-domain-watermark/1", "domain": {}, "key": {"secret": "ab" * 32}}])
def test_a_malformed_secret_is_one_line(broken):
    with pytest.raises(OMLError, match="secret"):
        read_secret(broken, "secret file")
