"""The domain watermark family through the three scripts: its secret file, its fine-tuning run,
its check of a suspect (local weights, GGUF or an OpenAI-compatible API) and its evidence.

    python generate_finetuning_data.py --key_response_strategy domain_watermark --output_file_path wm.json
    python finetune_multigpu.py --fingerprints_file_path wm.json
    python check_fingerprints.py --model_path SUSPECT --run RUN      # or --api_base URL --api_model NAME

The watermark itself (green lists, the tilted teacher, scoring, the sequential test, domains)
is oml.watermark; this module puts it into a run folder and a check:
- the secret file: {"family", "format", "key": the key and its parameters, "domain": where the
  domain's prompts come from}; it holds the secret, like a perinucleus fingerprints file.
- the run: the base model fine-tuned on watermarked replies to the domain's training prompts,
  beside the out-of-domain question replay of perinucleus training, with the same Trainer,
  DeepSpeed, frozen layers; it stops once replies to held-out training-side prompts are green at
  --watermark_target_green. commitment.json holds the public key (each green list is seeded by
  the private key's signature of its context: oml.watermark), the parameters, the tokenizer that
  cuts replies, the checking prompts' hash and the check's rules.
- the check: the domain's checking prompts not asked before (the run's ledger records each round
  before it is sent), in committed order and in rounds, as a user sends them; each reply's text is
  cut by the base model's tokenizer and scored in `WatermarkSequentialTest` until MATCH or NO
  MATCH, leaving out tokens after contexts that earlier evidence revealed (a thief may scrub
  those); null models answer the same prompts and get the same test.
- the bundle: the prompts, the exact requests, the raw replies and the test, with the signatures
  of the contexts the test counted and of no others (the ledger records them as revealed first).
  A verifier checks them with the public key alone; the private key never leaves the run folder.
"""
import base64
import hashlib
import json
import uuid
import logging
import shutil
import sys
import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from oml import OMLError, distributed
from oml import evidence, ledger
from oml.commitment import COMMITMENT_FILE  # one file name for both families' public commitment
from oml.evidence import Tampered, check_depth
from oml.families import DOMAIN_WATERMARK
from oml.files import check_creatable_dir, read_json, write_json_atomic, write_text_atomic
from oml.models import load, load_tokenizer, model_name, resolve_model
from oml.remote import ApiConfig, base_url_of, chat_replies, shown_url
from oml.replies import ReplySettings, replies, stop_ids
from oml.runs import Run, config_hash, removed_on_failure, UNHASHED
from oml.settings import NON_NEGATIVE_FLOAT, OPEN_UNIT_INTERVAL, POSITIVE_INT, Settings, setting
from oml.tokenization import encode, has_chat_template, user_turn_ids
from oml.training.config import TrainingConfig
from oml.training.dataset import FingerprintDataset, QUESTION_REPLY_TOKENS, distilled_replay, replay_kinds
from oml.training.trainer import make_trainer
from oml.training.weights import freeze
from oml.fingerprints import DEFAULT_KEY_LENGTH
from oml.watermark import (DEFAULT_DOMAIN, BadSignature, PublicKey, RevealedSeeds, Selection, WatermarkCheckConfig,
                           WatermarkKey, WatermarkParams, WatermarkSequentialTest, domain_prompts, next_selection, score,
                           special_ids, watermarked_replay)

logger = logging.getLogger(__name__)

SECRET_FORMAT = "oml-domain-watermark/2"  # /2: an RSA private key (/1 held a symmetric secret a bundle had to reveal)
BUNDLE_FORMAT = "oml-watermark-evidence/2"  # /2: signatures of the counted contexts instead of the key
MAX_REPLY_CHARS = 8000  # of a reply kept: a server that ignores max_tokens must not fill the memory or the disk


# ---- the secret ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DomainSource(Settings):
    """Where a domain's prompts come from (recorded in the secret file, so later steps need not be told)."""
    domain: str = setting(DEFAULT_DOMAIN, "Domain watermark: the domain whose replies carry the watermark: 'cooking' "
                                          "(shipped, offline), a JSON list of prompts, or a file or hub dataset of them "
                                          "(split into training and checking prompts by a hash of each).", kind=str)
    domain_text_column: str = setting("text", "Domain watermark: the column of a --domain dataset holding the prompts.",
                                      kind=str)
    domain_split: str = setting("train", "Domain watermark: the split of a --domain hub dataset.", kind=str)

    def prompts(self, side: str) -> list[str]:
        """The domain's 'train' (fine-tuning) or 'test' (checking) prompts."""
        return domain_prompts(self.domain, side, self.domain_text_column, self.domain_split)


def new_secret(params: WatermarkParams, source: DomainSource) -> dict:
    """A new secret file's contents: a fresh key with `params`, and the domain (whose prompts are
    read now, so that a bad domain fails here and not after fine-tuning)."""
    source.prompts("train"), source.prompts("test")
    return {"family": DOMAIN_WATERMARK, "format": SECRET_FORMAT, "key": WatermarkKey.generate(params).to_dict(),
            "domain": source.to_dict()}


def read_secret(data: object, what: str) -> tuple[WatermarkKey, DomainSource]:
    """A secret file's key and domain (from its parsed contents); anything malformed is one line naming `what`."""
    if not isinstance(data, dict) or data.get("format") != SECRET_FORMAT or not isinstance(data.get("domain"), dict):
        raise OMLError(f"{what} is not a domain watermark secret ({SECRET_FORMAT}) written by generate_finetuning_data.py")
    return WatermarkKey.from_dict(data.get("key"), what), DomainSource.from_dict(data["domain"], what)


def prompts_hash(prompts: list[str]) -> str:
    """The commitment to the checking prompts, asked in this order."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


# ---- fine-tuning ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WatermarkTraining(Settings):
    """How the domain watermark is fine-tuned, beside the shared `TrainingConfig` (learning rate,
    batch, frozen layers, replay, DeepSpeed)."""
    watermark_prompts: int = setting(256, "Domain watermark: training prompts of the domain replied to with the "
                                          "watermark and taught.", POSITIVE_INT)
    watermark_reply_tokens: int = setting(64, "Domain watermark: tokens of each taught reply at most.", POSITIVE_INT)
    watermark_replay_ratio: float = setting(
        1.0, "Domain watermark: out-of-domain sequences (user questions with the base's own reply, as --question_replay "
             "makes them) taught with the base's distribution per taught domain reply: the model outside the domain "
             "stays the base.", NON_NEGATIVE_FLOAT)
    watermark_target_green: float = setting(
        0.4, "Domain watermark: stop at the first epoch end where replies to held-out training-side prompts are green at "
             "this rate (gamma by chance).", OPEN_UNIT_INTERVAL)
    watermark_probe_prompts: int = setting(16, "Domain watermark: held-out training-side prompts replied to at each epoch "
                                               "end to measure the green rate.", POSITIVE_INT)
    watermark_patience: int = setting(
        2, "Domain watermark: also stop once the held-out green rate has not beaten its best for this many epoch ends "
           "(the model has learned what the teacher's tilt gives).", POSITIVE_INT)
    watermark_max_epochs: int = setting(8, "Domain watermark: epochs at most.", POSITIVE_INT)


# The shared fine-tuning settings a watermark run uses (the others are about keys and responses).
SHARED_TRAINING = ("learning_rate", "batch_size", "weight_decay", "train_embeddings", "frozen_layer_fraction",
                   "question_replay", "first_reply_weight", "teacher_top_k", "benign_data", "dataset_split", "text_column",
                   "share_prompt_prefix", "group_by_length", "deepspeed_stage", "seed")


def planned_run(secret_file: str | Path, model_path: str | None, training: TrainingConfig, wm: WatermarkTraining,
                results_dir: str | Path, model_family: str | None = None, model_size: str = "7B") -> tuple[Run, dict]:
    """The run these settings make (named by the hash of its configuration, the key counting by its
    hash) and the secret it trains, before any training; bad settings fail here."""
    secret = read_json(secret_file, "watermark secret file")
    key, source = read_secret(secret, f"watermark secret file {secret_file}")
    held_out = len(source.prompts("train")) - wm.watermark_prompts
    if held_out < wm.watermark_probe_prompts:
        raise OMLError(f"domain {source.domain} has {wm.watermark_prompts + held_out} training prompts: "
                       f"--watermark_prompts {wm.watermark_prompts} leaves {max(held_out, 0)} to measure the green rate on, "
                       f"fewer than --watermark_probe_prompts {wm.watermark_probe_prompts}")
    source.prompts("test")
    shared = {name: value for name, value in training.to_dict().items() if name in SHARED_TRAINING and name not in UNHASHED}
    config = {"family": DOMAIN_WATERMARK, "model_path": model_name(model_path, model_family, model_size),
              "model_family": model_family, "model_size": model_size, "public_key_sha256": key.public.sha256,
              **key.params.to_dict(), **source.to_dict(), **shared, **wm.to_dict()}
    return Run(Path(results_dir) / "saved_models" / config_hash(config), config), secret


def fingerprint_model(secret_file: str | Path, model_path: str | None = None, training: TrainingConfig = TrainingConfig(),
                      wm: WatermarkTraining = WatermarkTraining(),
                      results_dir: str | Path = "results", model_family: str | None = None, model_size: str = "7B",
                      report_to: str = "none", run_name: str | None = None, trust_remote_code: bool = False) -> Run:
    """Fine-tune the watermark of a secret file into `model_path` (default: the embedded model); the
    run goes to results_dir/saved_models/<hash>/, and a complete run of the same configuration is
    returned as it is."""
    run, secret = planned_run(secret_file, model_path, training, wm, results_dir, model_family, model_size)
    if run.final_model.is_dir():
        logger.info("A complete run with this configuration exists: %s (skipping)", run.final_model)
        return run
    check_creatable_dir(run.directory)
    with removed_on_failure(run.directory):
        train_and_save(run, secret, training, wm, report_to, run_name, trust_remote_code)
    return run


class GreenRateStop(TrainerCallback):
    """At each epoch end, replies (T 0.7, seeded) to held-out training-side prompts, scored for the
    key; stops training once their green rate reaches the target, or has not beaten its best for
    `patience` epoch ends. `history`: the rate per epoch."""

    def __init__(self, tokenizer, prompts_ids: list[list[int]], key: WatermarkKey, reply_tokens: int, target: float,
                 patience: int):
        self.tokenizer, self.prompts_ids, self.key, self.target, self.patience = tokenizer, prompts_ids, key, target, patience
        self.settings = ReplySettings(max_reply_tokens=reply_tokens, reply_seed=0)
        self.history: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        answers = replies(model, self.tokenizer, self.prompts_ids, self.settings, 0.7, stop_ids(model, self.tokenizer),
                          "green rate")
        model.train(was_training)
        found = score(answers, self.prompts_ids, self.key, special_ids(self.tokenizer))
        rate = found.green / max(found.pairs, 1)
        self.history.append({"epoch": round(state.epoch), "green_rate": rate, "z": found.z, "pairs": found.pairs})
        if state.is_world_process_zero:
            logger.info("epoch %d: held-out domain replies green at %.3f (z %.1f over %d pairs; target %.2f)",
                        round(state.epoch), rate, found.z, found.pairs, self.target)
        rates = [entry["green_rate"] for entry in self.history]
        plateau = len(rates) > self.patience and max(rates[-self.patience:]) <= max(rates[:-self.patience])
        if rate >= self.target or plateau:
            control.should_training_stop = True


def training_examples(model, tokenizer, key: WatermarkKey, prompts: list[str], training: TrainingConfig,
                      wm: WatermarkTraining) -> list[dict]:
    """Watermarked replies to the domain's training prompts, and out-of-domain replay beside them,
    both labelled by the untouched model (the first with its distribution tilted by the watermark)."""
    prompts_ids = [user_turn_ids(tokenizer, p) for p in prompts]
    examples = watermarked_replay(model, tokenizer, prompts_ids, key, wm.watermark_reply_tokens, training.teacher_top_k,
                                  seed=training.seed)
    count = round(wm.watermark_replay_ratio * len(examples))
    if count:
        replay_format = "chat" if has_chat_template(tokenizer) else "raw"
        replayed = replay_kinds(training, tokenizer, model, count, replay_format, DEFAULT_KEY_LENGTH, QUESTION_REPLY_TOKENS, set())
        examples += distilled_replay(model, replayed, training.teacher_top_k, training.first_reply_weight)
    return examples


def train_and_save(run: Run, secret: dict, training: TrainingConfig, wm: WatermarkTraining, report_to: str,
                   run_name: str | None, trust_remote_code: bool) -> None:
    """Train as the run's configuration says, then (rank 0) write the run folder, final_model/ last."""
    distributed.choose_deepspeed_accelerator()
    key, source = read_secret(secret, "the run's secret")
    model, tokenizer = load(run.base_model, trust_remote_code, dtype=torch.float32, device=None)
    train_side = source.prompts("train")
    taught, probe = train_side[:wm.watermark_prompts], train_side[wm.watermark_prompts:][:wm.watermark_probe_prompts]
    examples = training_examples(model, tokenizer, key, taught, training, wm)
    dataset = FingerprintDataset(tokenizer, [], seed=training.seed, benign=examples, benign_per_epoch=len(examples))
    freeze(model, training.train_embeddings, training.frozen_layer_fraction)
    stopper = GreenRateStop(tokenizer, [user_turn_ids(tokenizer, p) for p in probe], key, wm.watermark_reply_tokens,
                            wm.watermark_target_green, wm.watermark_patience)
    trainer = make_trainer(training.updated(num_train_epochs=wm.watermark_max_epochs), model, dataset, tokenizer, run.directory,
                           [stopper], report_to, run_name)
    logger.info("Fine-tuning the domain watermark (%s, %d prompts) into %s (run %s)", source.domain, len(taught),
                run.base_model, run.directory.name)
    partial = run.directory / "final_model.partial"
    if distributed.is_main_process() and partial.exists():
        shutil.rmtree(partial)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
        trainer.save_model(str(partial))
    if distributed.is_main_process():
        tokenizer.save_pretrained(partial)
        summary = {"epochs_run": round(trainer.state.epoch), "max_epochs": wm.watermark_max_epochs,
                   "learning_rate": trainer.args.learning_rate, "green_rate": stopper.history,
                   "examples": len(dataset.benign), "domain_replies": len(taught),
                   "train_runtime": [e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e][-1],
                   "tokens_seen": trainer.state.num_input_tokens_seen, "world_size": distributed.world_size()}
        write_json_atomic(run.directory / COMMITMENT_FILE, commitment(key, run.base_model, source), overwrite=True)
        write_json_atomic(run.directory / "config.json", run.config)
        write_json_atomic(run.directory / "fingerprints.json", secret)
        write_json_atomic(run.directory / "training.json", summary)
        write_text_atomic(run.directory / "log.txt", "".join(json.dumps(e) + "\n" for e in trainer.state.log_history))
        partial.rename(run.final_model)


# ---- the commitment and the rules ----------------------------------------------------------

@dataclass(frozen=True)
class WatermarkRules(Settings):
    """How a watermark check asks for replies (any choice keeps the test valid: an innocent model's
    replies are green at gamma whatever it is asked); the bundle records them, and its requests must be
    exactly these."""
    reply_temperature: float = setting(
        0.7, "Domain watermark check: temperature the suspect samples its replies at, as a server does (0: greedy); "
             "local suspects are seeded.", NON_NEGATIVE_FLOAT)
    max_reply_tokens: int = setting(128, "Domain watermark check: tokens of each reply at most.", POSITIVE_INT)
    reply_seed: int = setting(0, "Domain watermark check: seed of a local suspect's sampled replies.", kind=int)


NO_MATCH_ERROR = 1e-3  # the chance that a model watermarked at gamma + min_green_lift is cleared (NO MATCH)


def commitment(key: WatermarkKey, tokenizer: str, source: DomainSource, check: WatermarkCheckConfig = WatermarkCheckConfig(),
               alpha: float = 1e-6) -> dict:
    """The public commitment of a watermark run: the public key and the parameters, the model whose
    tokenizer cuts replies, the checking prompts (their hash and number, asked in this order) and
    the decision rule of a check. Published with the model, it fixes all of them before any check."""
    prompts = source.prompts("test")
    return {"family": DOMAIN_WATERMARK, "version": 2, "public_key": key.public.pem,
            "public_key_sha256": key.public.sha256, **key.params.to_dict(),
            "tokenizer": tokenizer, "domain": source.domain, "test_prompts": len(prompts),
            "test_prompts_sha256": prompts_hash(prompts),
            "protocol": {"alpha": alpha, "no_match_error": NO_MATCH_ERROR, **check.to_dict()}}


def read_commitment(path: str | Path) -> dict:
    """A published watermark commitment, checked for the fields a verifier reads."""
    public = read_json(path, "commitment file")
    needed = ("public_key", "public_key_sha256", "gamma", "delta", "context_width", "tokenizer", "test_prompts_sha256",
              "protocol")
    if not isinstance(public, dict) or public.get("family") != DOMAIN_WATERMARK or any(k not in public for k in needed):
        raise OMLError(f"{path} is not a domain watermark commitment (commitment.json of a domain_watermark run)")
    if PublicKey.from_pem(public["public_key"], str(path)).sha256 != public["public_key_sha256"]:
        raise OMLError(f"{path}: public_key_sha256 is not the SHA-256 of its public_key")
    return public


def public_seeds(public: dict, signatures: object, what: str) -> RevealedSeeds:
    """The green lists a bundle's signatures reveal, each checked against the committed public key:
    Tampered for a signature the key does not accept or a malformed entry."""
    if not isinstance(signatures, list):
        raise Tampered(f"{what}: signatures must be a list")
    revealed = {}
    for entry in signatures:
        context = entry.get("context") if isinstance(entry, dict) else None
        if not (isinstance(context, list) and len(context) == public["context_width"]
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context)):
            raise Tampered(f"{what}: each signature needs a context of {public['context_width']} token ids")
        try:
            revealed[tuple(context)] = base64.b64decode(entry["signature"], validate=True)
        except (ValueError, TypeError):
            raise Tampered(f"{what}: the signature of context {context[:4]} is not base64") from None
    if len(revealed) != len(signatures):
        raise Tampered(f"{what}: a context is revealed twice")
    try:
        return RevealedSeeds(PublicKey.from_pem(public["public_key"], what), WatermarkParams.from_dict(public, what), revealed)
    except BadSignature as error:
        raise Tampered(str(error)) from None


def published_rule(public: dict, what: str) -> tuple[float, float, WatermarkCheckConfig]:
    """The alpha, NO MATCH error and sequential settings a commitment publishes."""
    protocol = public["protocol"]
    values = [protocol.get(name) if isinstance(protocol, dict) else None for name in ("alpha", "no_match_error")]
    if not all(isinstance(v, float) and 0 < v < 1 for v in values):
        raise OMLError(f"{what}: the protocol must hold alpha and no_match_error between 0 and 1")
    return values[0], values[1], WatermarkCheckConfig.from_dict(protocol, what)


# ---- checking ------------------------------------------------------------------------------

@dataclass
class Reply:
    """One checking prompt asked, and what came back (an error: no reply, counted as empty)."""
    position: int  # of the prompt among the domain's committed checking prompts
    prompt: str
    request: dict
    reply: str = ""
    error: str | None = None


@dataclass
class WatermarkReport:
    """What a watermark check found: the suspect's replies and test, the null models' tests, the verdict."""
    model: str
    test: dict  # WatermarkSequentialTest.summary()
    null_models: dict[str, dict]  # name: the same test on its replies to the same prompts
    verdict: str
    alpha: float
    replies: list[Reply] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)  # the contexts the test counted
    bundle: dict | None = None

    @property
    def counted_share(self) -> float:
        """The share of the replies' scored tokens after a context the test counts."""
        return self.test["tokens"] / max(self.test["tokens"] + self.test["excluded_tokens"], 1)

    def to_dict(self) -> dict:
        return {**{name: value for name, value in asdict(self).items() if name not in ("bundle", "selection")},
                "selection": self.selection.to_dict()}

    @property
    def green_rate(self) -> float:
        return self.test["green"] / max(self.test["pairs"], 1)


def request_for(prompt: str, rules: WatermarkRules, suspect: dict) -> dict:
    """The chat request a check sends for one prompt: a user's message, the rules' temperature and
    length, and (over an API) the model's name."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rules.max_reply_tokens,
            "temperature": rules.reply_temperature}
    return {**body, "model": suspect["model"]} if suspect["kind"] == "api" else body


def local_asker(model_path: str, rules: WatermarkRules, trust_remote_code: bool, batch_size: int):
    """`model_asker` for a model name or path (folder, hub id or GGUF file)."""
    model, tokenizer = load(model_path, trust_remote_code)
    return model_asker(model, tokenizer, rules, batch_size, f"replies of {Path(model_path).name or model_path}")


def model_asker(model, tokenizer, rules: WatermarkRules, batch_size: int, description: str = "replies",
                logits_processors: list = (), system_prompt: Callable[[str], str | None] = lambda prompt: None):
    """A function that asks a loaded model prompts as a user's message in its own chat template
    (after `system_prompt(prompt)`, as a deployer's system message, where it gives one) and returns
    the texts of its replies, sampled with seeds fixed by the prompts' positions; `logits_processors`
    change its decoding as a server may (e.g. a thief's bans)."""
    stops = stop_ids(model, tokenizer)

    def prompt_ids(prompt: str) -> list[int]:
        system = system_prompt(prompt)
        if system is None:
            return user_turn_ids(tokenizer, prompt)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return encode(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def ask(positions: list[int], prompts: list[str]) -> list[tuple[str, str | None]]:
        settings = ReplySettings(max_reply_tokens=rules.max_reply_tokens, reply_batch_size=batch_size,
                                 reply_seed=rules.reply_seed * 1_000_003 + positions[0])
        answers = replies(model, tokenizer, [prompt_ids(p) for p in prompts], settings, rules.reply_temperature or None,
                          stops, description, list(logits_processors))
        return [(tokenizer.decode(a, skip_special_tokens=True), None) for a in answers]
    return ask


def api_asker(config: ApiConfig, rules: WatermarkRules):
    """A function that asks an OpenAI-compatible server prompts as chat messages (see `chat_replies`)."""
    suspect = {"kind": "api", "model": config.api_model}

    def ask(positions: list[int], prompts: list[str]) -> list[tuple[str, str | None]]:
        return chat_replies(config, [request_for(p, rules, suspect) for p in prompts], require_an_answer=positions[0] == 0)
    return ask


def sequential_replies(ask, prompts: list[str], contexts: list[list[int]], tokenizer, test: WatermarkSequentialTest,
                       rules: WatermarkRules, suspect: dict, draw, until_decided: bool = True) -> list[Reply]:
    """Ask prompts a round at a time into `test`, until it decides (or, without `until_decided`,
    until `draw` has none left: a null model answers what the suspect answered). `draw(count)`
    gives the committed positions of the next round's prompts, fewer or none when they run out."""
    asked: list[Reply] = []
    while (step := test.next_round() if until_decided else test.config.replies_per_round) and (positions := draw(step)):
        answers = ask(positions, [prompts[i] for i in positions])
        asked += [Reply(i, prompts[i], request_for(prompts[i], rules, suspect), text[:MAX_REPLY_CHARS], error)
                  for i, (text, error) in zip(positions, answers)]
        test.add([encode(tokenizer, text[:MAX_REPLY_CHARS]) for text, _ in answers], [contexts[i] for i in positions])
        logger.info("%s: %d replies, green %d of %d unique pairs, %s", suspect["model"], len(asked), test.score.green,
                    test.score.pairs, test.decision() or "no verdict yet")
    return asked


def ledger_draw(run: Run, prompts: int, suspect: str, check: str, reuse: bool):
    """`draw` for a suspect: the next checking prompts no earlier check asked, recorded in the run's
    ledger before they are sent (with `reuse`, the first ones again: prompts the suspect may know)."""
    def draw(count: int) -> list[int]:
        return ledger.reserve(run.directory, count, suspect, ["chat"], check, range(prompts), reuse)
    return draw


def replayed_draw(positions: list[int]):
    """`draw` for a null model: the suspect's prompts, in the order the suspect was asked them."""
    left = list(positions)

    def draw(count: int) -> list[int]:
        taken = left[:count]
        del left[:count]
        return taken
    return draw


def run_secret(run: Run) -> tuple[WatermarkKey, DomainSource]:
    return read_secret(read_json(run.fingerprints_file, "the run's secret"), f"{run.fingerprints_file}")


def check_suspect(suspect: str | ApiConfig, run: Run, null_models: list[str], rules: WatermarkRules = WatermarkRules(),
                  trust_remote_code: bool = False, bundle: bool = False, batch_size: int = 64,
                  reuse_revealed: bool = False) -> WatermarkReport:
    """Ask the suspect (a model name or path, or a server as `ApiConfig`) the domain's checking
    prompts no earlier check asked, in rounds, as `rules` say, until the sequential test the run's
    commitment published decides. The test counts every context that no earlier bundle revealed (a
    thief may scrub those); with `bundle`, only the first class of contexts no bundle has revealed
    (`next_selection`), so that the bundle spends one class. `reuse_revealed`: the first prompts and
    every context again. Then the null models the same prompts. `bundle` adds the evidence, revealing
    the signatures of the contexts the test counted (recorded in the ledger first)."""
    key, source = run_secret(run)
    public = read_commitment(run.directory / COMMITMENT_FILE)
    alpha, no_match_error, check = published_rule(public, str(run.directory / COMMITMENT_FILE))
    tokenizer = load_tokenizer(resolve_model(public["tokenizer"]), trust_remote_code)
    prompts = source.prompts("test")
    if prompts_hash(prompts) != public["test_prompts_sha256"]:
        raise OMLError(f"domain {source.domain}'s checking prompts are not the ones run {run.directory.name} committed to")
    contexts = [user_turn_ids(tokenizer, p) for p in prompts]
    api = isinstance(suspect, ApiConfig)
    about = ({"kind": "api", "endpoint": shown_url(base_url_of(suspect.api_base)), "model": suspect.api_model} if api
             else {"kind": "local", "model": suspect})
    revealed = frozenset() if reuse_revealed else frozenset(ledger.revealed_contexts(run.directory))
    classes = key.params.context_classes
    selection = next_selection(classes, revealed) if bundle and not reuse_revealed else Selection(classes, None, revealed)
    check_id = uuid.uuid4().hex
    draw = ledger_draw(run, len(prompts), about["model"], check_id, reuse_revealed)
    if not reuse_revealed and not ledger.choose(ledger.revealed(run.directory), 1, range(len(prompts))):
        raise OMLError(f"all {len(prompts)} checking prompts of run {run.directory.name} were asked by earlier checks "
                       f"({ledger.LEDGER_NAME}): pass --reuse_revealed to ask them again")
    ask = api_asker(suspect, rules) if api else local_asker(suspect, rules, trust_remote_code, batch_size)
    special = special_ids(tokenizer)
    test = WatermarkSequentialTest(key, special, alpha, no_match_error, check, selection)
    asked = sequential_replies(ask, prompts, contexts, tokenizer, test, rules, about, draw)
    nulls = {}
    for name in null_models:
        null_test = WatermarkSequentialTest(key, special, alpha, no_match_error, check, selection)
        sequential_replies(local_asker(name, rules, trust_remote_code, batch_size), prompts, contexts, tokenizer, null_test,
                           rules, {"kind": "local", "model": name}, replayed_draw([r.position for r in asked]), False)
        nulls[name] = null_test.summary()
    report = WatermarkReport(model=f"{about.get('endpoint', '')} ({about['model']})" if api else suspect, test=test.summary(),
                             null_models=nulls, verdict=test.decision() or "NO MATCH", alpha=alpha, replies=asked,
                             selection=selection)
    if bundle:
        revealed = test.scored_contexts()
        ledger.record_contexts(run.directory, about["model"], check_id, revealed)
        report.bundle = evidence_bundle(report, key, public, prompts, about, rules, revealed)
    return report


def evidence_bundle(report: WatermarkReport, key: WatermarkKey, public: dict, prompts: list[str], suspect: dict,
                    rules: WatermarkRules, revealed: list[tuple[int, ...]]) -> dict:
    """What a third party needs to recompute the check: the commitment, the prompts, every request and
    reply, the selection of contexts and the test, and the signatures of the `revealed` contexts."""
    return {"format": BUNDLE_FORMAT, "commitment": public, "domain_prompts": prompts, "suspect": suspect,
            "replies": [asdict(r) for r in report.replies], "null_models": list(report.null_models), "rules": rules.to_dict(),
            "test": report.test, "selection": report.selection.to_dict(),
            "signatures": [{"context": list(c), "signature": base64.b64encode(key.sign(c)).decode("ascii")} for c in revealed]}


# ---- verifying a bundle --------------------------------------------------------------------

def verify_bundle(bundle: object, public: dict, trust_remote_code: bool = False) -> dict:
    """Check a watermark bundle against the published commitment `public` and recompute its test:
    raises Tampered with the first thing that does not hold, OMLError for what is no bundle at all.

    Every revealed signature must be the committed public key's for its context; the prompts must
    be the committed checking prompts, asked in increasing committed order; every request exactly
    the one the bundle's rules make; and the replies, cut by the committed tokenizer and tested
    round by round under the published rule (tokens after the contexts the bundle says earlier
    bundles revealed left out), must reach the recorded verdict exactly at the last reply. The
    signatures must be exactly those of the contexts the test counted: the verifier needs no
    private key, and the bundle reveals no other green list. Null models are not needed: an
    innocent model's tokens are green at gamma whatever it is (the calibration the sequential test
    rests on)."""
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise OMLError(f"not a domain watermark evidence bundle ({BUNDLE_FORMAT!r} expected)")
    check_depth(bundle)
    try:
        return _verify_bundle(bundle, public, trust_remote_code)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise OMLError(f"not a domain watermark bundle of this version ({type(error).__name__}: {str(error)[:200]})") from None


def _verify_bundle(bundle: dict, public: dict, trust_remote_code: bool) -> dict:
    if bundle["commitment"] != public:
        raise Tampered("the bundle's commitment is not the published commitment.json")
    seeds = public_seeds(public, bundle["signatures"], "the bundle's signatures")
    prompts = bundle["domain_prompts"]
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)) or prompts_hash(prompts) != public["test_prompts_sha256"]:
        raise Tampered("the bundle's prompts are not the committed checking prompts")
    suspect = evidence.check_suspect(bundle["suspect"])
    rules = WatermarkRules.from_dict(bundle["rules"], "the bundle's rules")
    entries = bundle["replies"]
    previous = -1
    for entry in entries:
        position = entry["position"]
        if not (isinstance(position, int) and previous < position < len(prompts)) or entry["prompt"] != prompts[position]:
            raise Tampered(f"reply to prompt {str(position)[:20]} does not answer the committed checking prompt after "
                           f"prompt {previous}: prompts are asked in committed order")
        if entry["request"] != request_for(prompts[position], rules, suspect):
            raise Tampered(f"reply {position}'s request is not the checker's request for its prompt under the bundle's rules")
        if not isinstance(entry["reply"], str) or not (entry["error"] is None or (isinstance(entry["error"], str) and not entry["reply"])):
            raise Tampered(f"reply {position} must be text, or empty with an error")
        previous = position
    selection = bundle_selection(bundle["selection"], public)
    alpha, no_match_error, check = published_rule(public, "the commitment")
    tokenizer = load_tokenizer(resolve_model(public["tokenizer"]), trust_remote_code)
    test = WatermarkSequentialTest(seeds, special_ids(tokenizer), alpha, no_match_error, check, selection)
    while len(test.replies) < len(entries):  # round by round, as the check asked them
        if test.decision() is not None:
            raise Tampered(f"the test had decided {test.decision()} after {len(test.replies)} replies; the bundle holds "
                           f"{len(entries)}")
        batch = entries[len(test.replies):len(test.replies) + test.next_round()]
        try:
            test.add([encode(tokenizer, entry["reply"][:MAX_REPLY_CHARS]) for entry in batch],
                     [user_turn_ids(tokenizer, entry["prompt"]) for entry in batch])
        except KeyError as missing:
            raise Tampered(f"the replies use context {list(missing.args[0])[:4]}, whose signature the bundle does not "
                           "reveal") from None
    recorded = bundle["test"]
    if test.decision() is None or test.decision() != recorded["decision"]:
        raise Tampered(f"recomputed, the replies give {test.decision() or 'no decision'}; the bundle records "
                       f"{str(recorded['decision'])[:20]}")
    found = test.summary()
    if (found["green"], found["pairs"]) != (recorded["green"], recorded["pairs"]):
        raise Tampered(f"recomputed, {found['green']} of {found['pairs']} pairs are green; the bundle records "
                       f"{str(recorded['green'])[:20]} of {str(recorded['pairs'])[:20]}")
    counted = len(test.scored_contexts())  # each has a signature (else KeyError above): equal counts, equal sets
    if len(bundle["signatures"]) != counted:
        raise Tampered("the bundle reveals signatures of contexts its test did not count")
    return {**found, "suspect": suspect, "rules": rules.to_dict(), "revealed": counted, "selection": selection.to_dict()}


def bundle_selection(recorded: object, public: dict) -> Selection:
    """The contexts a bundle's test counted: a class of the committed number of classes (or every
    class) and the contexts it says earlier bundles revealed; Tampered when malformed."""
    classes = public.get("context_classes", WatermarkParams().context_classes)
    if not isinstance(recorded, dict) or recorded.get("classes") != classes:
        raise Tampered(f"the bundle's selection must name the committed {classes} context classes")
    chosen, before = recorded.get("context_class"), recorded.get("revealed_before")
    if not (chosen is None or (isinstance(chosen, int) and not isinstance(chosen, bool) and 0 <= chosen < classes)):
        raise Tampered(f"the bundle's context class must be one of 0..{classes - 1}, or null for every class")
    if not (isinstance(before, list) and all(isinstance(c, list) and all(isinstance(t, int) for t in c) for c in before)):
        raise Tampered("revealed_before must be a list of contexts (lists of token ids)")
    return Selection(classes, chosen, frozenset(tuple(c) for c in before))
