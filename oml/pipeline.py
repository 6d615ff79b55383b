"""The Python API: generating fingerprints, fingerprinting a model and checking a suspect, as
functions over the typed settings. The three scripts are thin command-line fronts to these.

    import oml

    fingerprints = oml.generate_fingerprints(oml.GenerationConfig(num_fingerprints=16, random_word_generation=True))
    # ... write them to a JSON file, then:
    run = oml.fingerprint_model("fingerprints.json", training=oml.TrainingConfig(num_train_epochs=5))
    report = oml.check_suspect(str(run.final_model), run=run)
    print(report.verdict, report.p_value)

Every function validates its settings before any slow work; a problem is an `oml.OMLError` with a
one-line message. Under a distributed launcher every rank calls them; only rank 0 writes files.
"""
import contextlib
import json
import logging
import shutil
import sys
import time
import uuid
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from oml import OMLError, distributed
from oml import ledger
from oml.checking import KeyResult, Query, accuracy, check_named_model, queries_for
from oml.commitment import read_commitment, revealed_records
from oml.evidence import MATCH_RULES, Protocol, RecordedTest, check_opens, judged, make_bundle
from oml.data import prompt_templates, texts_from
from oml.files import check_creatable_dir
from oml.fingerprints import IN_MEMORY, FingerprintSelection, query_formats, recorded, responses_per_key, selected_fingerprints
from oml.models import EMBEDDED_MODEL, compute_dtype, load, load_tokenizer, model_name, resolve_model
from oml.remote import ApiConfig, Interrupted, api_requests, base_url_of, check_over_api, shown_url
from oml.runs import Run, committed_records, config_hash, dataset_csv, load_run, removed_on_failure, run_config, save_run
from oml.sequential import SequentialConfig, SequentialTest
from oml.settings import POSITIVE_INT, Settings, setting
from oml.stats import VerdictConfig, findings, keys_needed, null_chance_rate
from oml.stats import verdict as verdict_at
from oml.tokenization import accepted, default_format, fingerprint_pairs, formats
from oml.training.callbacks import MemorisationProbe, ShrinkWeightChange, StopWhenMemorised, WeightAveragingCallback
from oml.training.config import TrainingConfig
from oml.training.dataset import build_dataset
from oml.training.trainer import make_trainer
from oml.training.weights import freeze, snapshot_weights

logger = logging.getLogger(__name__)


def fingerprint_model(fingerprints: str | Path | list[dict], model_path: str | None = None,
                      selection: FingerprintSelection = FingerprintSelection(), training: TrainingConfig = TrainingConfig(),
                      results_dir: str | Path = "results", model_family: str | None = None, model_size: str = "7B",
                      report_to: str = "none", run_name: str | None = None, trust_remote_code: bool = False) -> Run:
    """Fine-tune the fingerprints `selection` picks from a fingerprints file (or a list of records) into
    `model_path` (default: the embedded model). The run goes to `results_dir`/saved_models/<hash of its configuration>/; a
    complete run with the same configuration is returned as it is, without training again."""
    run, fingerprints = planned_run(fingerprints, model_path, selection, training, results_dir, model_family, model_size,
                                    trust_remote_code)
    if run.final_model.is_dir():
        logger.info("A complete run with this configuration exists: %s (skipping)", run.final_model)
        return run
    check_creatable_dir(run.directory)
    with removed_on_failure(run.directory):
        train_and_save(run, fingerprints, report_to, run_name, trust_remote_code)
    return run


def planned_run(fingerprints_file: str | Path | list[dict], model_path: str | None, selection: FingerprintSelection,
                training: TrainingConfig, results_dir: str | Path, model_family: str | None = None, model_size: str = "7B",
                trust_remote_code: bool = False) -> tuple[Run, list[dict]]:
    """The run these settings make (its configuration fully resolved, so its hash names it) and the
    fingerprints it trains, before any training."""
    fingerprints, selection, _ = selected_fingerprints(selection, fingerprints_file)
    if training.benign_ratio:  # a bad --benign_data file fails here, before any model is loaded, even where user questions fill the replay
        texts_from(training.benign_data, training.dataset_split, training.text_column, "train", count=1)
    name = model_name(model_path, model_family, model_size)
    key_format = (training.key_format or recorded(fingerprints, "key_format")
                  or default_format(load_tokenizer(resolve_model(name), trust_remote_code)))
    config = run_config(name, model_family, model_size, selection, training.updated(key_format=key_format), fingerprints)
    return Run(Path(results_dir) / "saved_models" / config_hash(config), config), fingerprints


def train_and_save(run: Run, fingerprints: list[dict], report_to: str = "none", run_name: str | None = None,
                   trust_remote_code: bool = False) -> None:
    """Train as the run's configuration says, then (rank 0) write the run folder with final_model/ appearing last."""
    distributed.choose_deepspeed_accelerator()  # the Trainer may import DeepSpeed
    selection, training = run.selection, run.training
    # fp32 master weights; the Trainer (bf16 autocast) or DeepSpeed (bf16 copy) decide the compute dtype
    model, tokenizer = load(run.base_model, trust_remote_code, dtype=torch.float32, device=None)
    pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
    dataset = build_dataset(training, tokenizer, pairs, model)
    freeze(model, training.train_embeddings, training.frozen_layer_fraction)
    original = snapshot_weights(model, compute_dtype()) if training.forgetting_regularizer_strength > 0 or training.shrinks else {}
    probe = MemorisationProbe(tokenizer, pairs, formats(training.key_format), training.memorised_probability)
    stopper = StopWhenMemorised(probe, training.memorised_patience, training.memorised_share)
    shrinker = ShrinkWeightChange(original, probe)
    callbacks = []
    if training.forgetting_regularizer_strength > 0:
        callbacks.append(WeightAveragingCallback(original, training.forgetting_regularizer_strength))
    if training.stop_when_memorised:
        callbacks.append(stopper)  # after averaging: it judges the weights training ends on
    if training.shrinks:
        callbacks.append(shrinker)
    trainer = make_trainer(training, model, dataset, tokenizer, run.directory, callbacks, report_to, run_name)
    logger.info("Fine-tuning %d fingerprints into %s (run %s)", len(pairs), run.base_model, run.directory.name)
    partial = run.directory / "final_model.partial"
    if distributed.is_main_process() and partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    with contextlib.redirect_stdout(sys.stderr):  # libraries print; stdout is for results
        trainer.train()
        trainer.save_model(str(partial))  # collective under ZeRO-3; only rank 0 writes
    if distributed.is_main_process():
        tokenizer.save_pretrained(partial)
        epochs = round(trainer.state.epoch)
        logger.info("Trained %d of at most %d epochs", epochs, training.num_train_epochs)
        summary = {"epochs_run": epochs, "max_epochs": training.num_train_epochs, "learning_rate": trainer.args.learning_rate,
                   "memorised": stopper.history,
                   "weight_change_scale": shrinker.scale, "shrink": shrinker.history, "shrink_seconds": shrinker.seconds,
                   "train_runtime": [e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e][-1],
                   "tokens_seen": trainer.state.num_input_tokens_seen, "world_size": distributed.world_size(),
                   "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        save_run(run.directory, partial, run.config, fingerprints, dataset_csv(tokenizer, pairs), trainer.state.log_history, summary,
                 committed_records(tokenizer, pairs, training.key_format), Protocol(formats(training.key_format)).to_dict())
        with open(run.directory.parent.parent / "all_run_logs.txt", "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "config_hash": run.directory.name, **run.config}) + "\n")


@dataclass
class CheckReport:
    """What a check found: per key format and overall, the verdict, and every per-key result.
    `to_dict()` is the JSON report that check_fingerprints.py --output_json writes."""
    model: str
    fingerprints_file: str
    format: str  # the format the verdict rests on (the smallest p-value)
    num_fingerprints: int
    accuracy: float
    fractional_accuracy: float
    matches: int
    null_models: list[dict]
    chance_rate: float
    formats: list[dict]
    log10_p_value: float
    p_value: float
    verdict: str
    system_prompts: list[dict]
    min_chance_rate: float
    alpha: float
    keys_needed: int | None
    sequential: dict | None = None  # the sequential test's state at the end (None: every selected key was asked)
    revealed: dict | None = None  # with a run's ledger: the committed positions this check revealed, and how many remain
    results: list[KeyResult] = field(default_factory=list)
    fingerprints: list[dict] = field(default_factory=list)
    bundle: dict | None = None  # the evidence bundle for third parties, when asked for (written separately)
    served_models: list[str] = field(default_factory=list)  # API: the model names the server said answered
    partial: bool = False  # interrupted (Ctrl-C): the results of the requests answered before

    def to_dict(self) -> dict:
        report = {name: value for name, value in asdict(self).items() if name not in ("results", "fingerprints", "bundle")}
        report["keys"] = [{**self.fingerprints[r.index], **r.to_dict()} for r in self.results]
        return report


class CheckInterrupted(KeyboardInterrupt):
    """Ctrl-C during an API check: `report` holds the answers so far, marked partial (no evidence bundle)."""

    def __init__(self, report: CheckReport):
        super().__init__("interrupted")
        self.report = report


class Disclosure:
    """Which selected keys a check may send, in committed order, and the record of those it sends.

    A key sent to a suspect's server is known to its operator from then on, and so is every key
    in a published evidence bundle. With a run's own fingerprints, such checks draw only keys that
    no earlier check revealed (unless `reuse`), and record them in the run's ledger before sending
    them. A local check that writes no bundle reveals nothing and asks every selected key."""

    def __init__(self, run: Run | None, own_fingerprints: bool, offset: int, count: int, suspect: str, reveals: bool,
                 reuse: bool):
        self.run_dir = run.directory if run is not None and own_fingerprints and reveals else None
        if self.run_dir is not None:  # the ledger is written before any key is sent: a folder that takes no file is refused now
            try:
                check_creatable_dir(self.run_dir)
            except OMLError as error:
                raise OMLError(f"this check reveals keys and records them in the run's ledger first, but {error}") from None
        self.offset, self.suspect, self.reuse = offset, suspect, reuse
        self.check = uuid.uuid4().hex
        positions = range(offset, offset + count)
        if self.run_dir is not None and not reuse:
            positions = ledger.unrevealed(self.run_dir, positions)
        self.candidates = [p - offset for p in positions]  # indices into the selected fingerprints
        if not self.candidates:
            raise OMLError(f"every selected key of run {run.directory} was revealed by earlier checks (see its "
                           f"{ledger.LEDGER_NAME}); select others, or pass --reuse_revealed to ask known keys again")
        self.sent: list[int] = []

    def reserve(self, count: int, key_formats: tuple[str, ...]) -> list[int]:
        """The next `count` candidate keys after those this check already sent, recorded as revealed first."""
        after = self.sent[-1] if self.sent else -1
        wanted = [i for i in self.candidates if i > after]
        if self.run_dir is None:
            chosen = wanted[:count]
        else:
            positions = ledger.reserve(self.run_dir, count, self.suspect, list(key_formats), self.check,
                                       [self.offset + i for i in wanted], self.reuse)
            chosen = [p - self.offset for p in positions]
            if chosen and chosen != wanted[:len(chosen)]:
                raise OMLError("another check of this run revealed keys at the same time, so this check's keys are not "
                               "consecutive; run the checks of one run one after another")
        self.sent += chosen
        return chosen

    def summary(self, count: int) -> dict | None:
        """The committed positions this check revealed, and how many of the `count` selected keys a later
        check can still draw (`ledger.unrevealed`)."""
        if self.run_dir is None:
            return None
        return {"positions": [self.offset + i for i in self.sent], "ledger": str(ledger.ledger_path(self.run_dir)),
                "never_revealed": ledger.remaining(self.run_dir, range(self.offset, self.offset + count))}


@dataclass(frozen=True)
class CheckConfig(Settings):
    """How a check asks a suspect, beside which keys it asks (`FingerprintSelection`) and how it
    decides (`VerdictConfig`, `SequentialConfig`)."""
    tokenizer: str | None = setting(
        None, "With --api_base: the tokenizer that cuts keys and responses (default: the --run's base model, else the "
              "embedded model).", kind=str)
    batch_size: int = setting(64, "Keys per forward pass.", POSITIVE_INT)
    system_prompts: str | None = setting(
        None, "Also check each key inside every template: 'test' (10 unseen), 'train' (20) or a JSON list file.", kind=str)
    null_model: tuple[str, ...] | None = setting(
        None, "Models never fingerprinted, checked on the same keys to measure the chance rate (default: the --run's base "
              "model, else the embedded model; 'none' to skip).", kind=str, nargs="+")
    check_all_keys: bool = setting(
        False, "API suspects: ask every selected key (at once) instead of the sequential check, which sends keys in rounds "
               "and stops as soon as the verdict is reached: every key sent is known to the server's operator from then on.")
    reuse_revealed: bool = setting(
        False, "With --run: also ask keys that earlier checks revealed (recorded in the run's revealed.jsonl); by default a "
               "check that reveals keys draws only keys never revealed. A domain watermark run: ask its first checking "
               "prompts again and count the contexts earlier bundles revealed.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.null_model and len(self.null_model) > 1 and any(name.lower() == "none" for name in self.null_model):
            raise OMLError("--null_model none means no null model; it cannot be combined with models")

    def null_models(self, run: Run | None) -> list[str]:
        """The null models to ask: those named ('none': no null model), else the run's base model, else the embedded model."""
        if self.null_model is None:
            return [run.base_model if run else EMBEDDED_MODEL]
        return [] if self.null_model[0].lower() == "none" else list(self.null_model)


def check_suspect(suspect: str | ApiConfig, fingerprints_file: str | Path | list[dict] | None = None,
                  run: Run | str | Path | None = None, selection: FingerprintSelection = FingerprintSelection(),
                  query_format: str | None = None, config: CheckConfig = CheckConfig(), verdict: VerdictConfig = VerdictConfig(),
                  sequential: SequentialConfig = SequentialConfig(), trust_remote_code: bool = False,
                  bundle: bool = False) -> CheckReport:
    """Ask a suspect (a model name or path, or a server as `ApiConfig`) the selected keys in every
    format (`query_format`), and the null models the bare keys, and weigh what they answer. Settings left
    None come from `run` (a `Run` or its folder), else from the fingerprints; `config` says how the
    suspect is asked (see `CheckConfig`).

    A server learns every key it is asked, so an API suspect is checked `sequential`ly: in rounds,
    until the verdict is reached (unless `config.check_all_keys`). With a run, keys a server or a bundle
    has seen are spent: they are recorded in the run's ledger and not asked again (unless
    `config.reuse_revealed`). `bundle` adds an evidence bundle a third party can verify against the
    run's published commitment (`report.bundle`). Ctrl-C during an API check raises `CheckInterrupted`,
    whose report holds the answers so far, marked partial."""
    run = load_run(run) if isinstance(run, (str, Path)) else run
    fingerprints, selection, fingerprints_file = selected_fingerprints(selection, fingerprints_file, run)
    verdict = verdict.for_responses(responses_per_key(fingerprints))
    own = run is not None and fingerprints_file != IN_MEMORY and Path(fingerprints_file).resolve() == run.fingerprints_file.resolve()
    api = isinstance(suspect, ApiConfig)
    if api and (not suspect.api_base or not suspect.api_model):
        raise OMLError("an API suspect needs --api_base URL and --api_model NAME")
    if bundle:
        check_evidence_possible(run, own, selection, query_format, config.tokenizer)
    templates = [None] + (prompt_templates(config.system_prompts) if config.system_prompts else [])
    name = f"{shown_url(suspect.api_base)} ({suspect.api_model})" if api else suspect
    disclosure = Disclosure(run, own, selection.data_split, len(fingerprints), name, api or bundle, config.reuse_revealed)
    if api or bundle:  # the owner's cut: sent as text, or proved against the commitment
        owner_tokenizer = load_tokenizer(resolve_model(config.tokenizer or (run.base_model if run else None)), trust_remote_code)
        # A bundle proves its keys among all the run's committed fingerprints: then all are cut, and the selected ones taken.
        cut = selected_fingerprints(FingerprintSelection(), None, run).fingerprints if bundle else fingerprints
        owner_pairs = fingerprint_pairs(owner_tokenizer, cut, selection.max_key_length, selection.max_response_length)
        pairs = owner_pairs[selection.data_split:][:len(fingerprints)] if bundle else owner_pairs
    if api:
        key_formats = query_formats(query_format, fingerprints, None, run)

        def ask(indices: list[int], require_an_answer: bool = True) -> list[KeyResult]:
            requests = api_requests(owner_tokenizer, pairs, queries_for(key_formats, templates), indices)
            return check_over_api(suspect, requests, require_an_answer=require_an_answer)
    else:
        key_formats = query_formats(query_format, fingerprints, load_tokenizer(resolve_model(suspect), trust_remote_code), run)
        distributed.init()

        def ask(indices: list[int], require_an_answer: bool = True) -> list[KeyResult]:
            return check_subset(suspect, fingerprints, indices, selection, queries_for(key_formats, templates),
                                config.batch_size, suspect=True, trust_remote_code=trust_remote_code)
    sequential = sequential if api and not config.check_all_keys else None
    if bundle:
        warn_unpublished_rules(run, "api" if api else "local", key_formats, verdict, sequential, responses_per_key(fingerprints))
    if sequential is not None and verdict.min_chance_rate > 0:  # the fewest keys any chance rate allows, before slow work
        SequentialTest(verdict.min_chance_rate, verdict.alpha, key_formats, sequential, len(disclosure.candidates)).check_enough_keys()
    nulls = {null: check_subset(null, fingerprints, disclosure.candidates, selection, queries_for(key_formats), config.batch_size,
                                trust_remote_code=trust_remote_code) for null in config.null_models(run)}
    if api:  # judged by the suspect's rule (see oml.evidence.judged)
        responses = {i: [owner_tokenizer.decode(ids) for ids in accepted(response_ids)] for i, (_, response_ids) in enumerate(pairs)}
        nulls = {name: judged(results, responses, MATCH_RULES["api"]) for name, results in nulls.items()}
    if sequential is not None:
        results, test, interrupted = sequential_check(ask, disclosure, key_formats, nulls, verdict, sequential)
        found, state = sequential_findings(test, results, nulls, key_formats), test.summary()
    else:
        try:
            results, state, interrupted = ask(disclosure.reserve(len(disclosure.candidates), key_formats)), None, False
        except Interrupted as stop:
            results, state, interrupted = stop.results, None, True
        found = findings(results, nulls, key_formats, verdict)
    report = CheckReport(
        model=name, fingerprints_file=fingerprints_file, **found,
        system_prompts=[{"format": f, "template": t,
                         "accuracy": accuracy([r for r in results if r.format == f and r.template == t and r.error is None])[0]}
                        for f in key_formats for t in templates],
        min_chance_rate=verdict.min_chance_rate, alpha=verdict.alpha,
        keys_needed=keys_needed(verdict.alpha, verdict.min_chance_rate, len(nulls)), sequential=state,
        revealed=disclosure.summary(len(fingerprints)), results=results, fingerprints=fingerprints,
        served_models=sorted({r.served_model for r in results if r.served_model}), partial=interrupted)
    if interrupted:
        raise CheckInterrupted(report)
    if bundle:
        about = ({"kind": "api", "endpoint": shown_url(base_url_of(suspect.api_base)), "model": suspect.api_model} if api
                 else {"kind": "local", "model": suspect})
        records = committed_records(owner_tokenizer, owner_pairs, run.training.key_format)
        report.bundle = evidence_bundle(report, run, records, disclosure, about, nulls, key_formats, verdict, sequential)
    return report


def check_subset(model: str, fingerprints: list[dict], indices: list[int], selection: FingerprintSelection, queries: list,
                 batch_size: int, suspect: bool = False, trust_remote_code: bool = False) -> list[KeyResult]:
    """`check_named_model` on some of the fingerprints, its results indexed as in the whole list."""
    results = check_named_model(model, [fingerprints[i] for i in indices], selection, queries, batch_size, suspect=suspect,
                                trust_remote_code=trust_remote_code)
    return [replace(r, index=indices[r.index]) for r in results]


def sequential_check(ask, disclosure: Disclosure, key_formats: tuple[str, ...], nulls: dict[str, list[KeyResult]],
                     verdict: VerdictConfig, config: SequentialConfig) -> tuple[list[KeyResult], SequentialTest, bool]:
    """Send keys in rounds until the sequential test decides, or Ctrl-C interrupts (then True, with
    the interrupted round's answers). Its chance rate is fixed first, from the null models on every
    candidate key (checked locally: that reveals nothing)."""
    rate = null_chance_rate(nulls, key_formats, verdict.min_chance_rate)
    test = SequentialTest(rate, verdict.alpha, key_formats, config, len(disclosure.candidates))
    test.check_enough_keys()
    results: list[KeyResult] = []
    interrupted = False
    while test.next_round():
        indices = disclosure.reserve(test.next_round(), key_formats)
        if not indices:
            break
        try:  # a round without answers ends the check only if no round had any
            answers = ask(indices, not any(r.error is None for r in results))
        except Interrupted as stop:
            answers, interrupted = stop.results, True
        results += answers
        for i in indices:
            test.add_key({r.format: r.match for r in answers if r.index == i and r.template is None})
        logger.info("round of %d keys: %s", len(indices), test.decision() or "no verdict yet")
        if interrupted:
            break
    return sorted(results, key=lambda r: (r.query, r.index)), test, interrupted


def sequential_findings(test: SequentialTest, results: list[KeyResult], nulls: dict[str, list[KeyResult]],
                        key_formats: tuple[str, ...]) -> dict:
    """The report's findings for a sequential check: the fixed-sample ones over the keys asked,
    with the sequential test's anytime-valid p-values and verdict in place of the binomial ones."""
    state = test.summary()
    found = findings(results, nulls, key_formats, VerdictConfig(min_chance_rate=state["chance_rate"], alpha=test.alpha))
    for entry, tested in zip(found["formats"], state["formats"]):
        entry["chance_rate"] = state["chance_rate"]
        entry["log10_p_value"] = min(0.0, -tested["log10_likelihood_ratio"])
    best = min(found["formats"], key=lambda e: e["log10_p_value"])
    found.update({k: best[k] for k in ("format", "num_fingerprints", "accuracy", "fractional_accuracy", "matches", "null_models")})
    found.update(chance_rate=state["chance_rate"], log10_p_value=test.log10_p_value, p_value=10 ** test.log10_p_value,
                 verdict=test.decision() or verdict_at(test.log10_p_value, test.alpha))  # undecided: interrupted
    return found


def check_evidence_possible(run: Run | None, own: bool, selection: FingerprintSelection, query_format: str | None,
                            tokenizer: str | None) -> None:
    """An evidence bundle proves keys against the run's published commitment: it needs the run, its own
    fingerprints, asked as they were committed (cut, strategy, formats, tokenizer), by one process."""
    if distributed.world_size() > 1:
        raise OMLError("--evidence runs in one process: start check_fingerprints.py with python")
    if run is None or not own:
        raise OMLError("--evidence needs --run (the run's committed fingerprints): a bundle proves its keys against the "
                       "run's published commitment")
    if run.commitment is None:
        raise OMLError(f"run {run.directory} has no commitment to prove keys against: python commit_fingerprints.py --run "
                       f"{run.directory} (and publish its root)")
    trained = run.selection
    if (selection.max_key_length, selection.max_response_length, selection.fingerprint_generation_strategy) != (
            trained.max_key_length, trained.max_response_length, trained.fingerprint_generation_strategy):
        raise OMLError("--evidence needs the keys asked as they were trained and committed: leave out --max_key_length, "
                       "--max_response_length and --fingerprint_generation_strategy")
    if query_format is not None and not set(formats(query_format)) <= set(formats(run.training.key_format)):
        raise OMLError(f"--evidence: the run committed its keys as {run.training.key_format!r}; --query_format "
                       f"{query_format} asks them in a format they were not committed in")
    if tokenizer is not None and resolve_model(tokenizer) != resolve_model(run.base_model):
        raise OMLError("--evidence needs the keys cut by the run's own tokenizer: leave out --tokenizer")


def warn_unpublished_rules(run: Run, kind: str, key_formats: tuple[str, ...], verdict: VerdictConfig,
                           sequential: SequentialConfig | None, responses: int) -> None:
    """Say, before any key is sent, where this check departs from the protocol the run's commitment
    published: its bundle will not verify against it (verify_evidence.py --commitment)."""
    if "protocol" not in run.commitment:
        return
    protocol = Protocol.from_dict(run.commitment["protocol"], str(run.directory / "commitment.json"))
    published = protocol.verdict.for_responses(responses)
    test = "sequential" if sequential is not None else "fixed"
    departures = [] if test == protocol.tests[kind] else [f"a {test} test, not the published {protocol.tests[kind]}"]
    if protocol.formats and tuple(protocol.formats) != tuple(key_formats):
        departures.append(f"formats {', '.join(key_formats)}, not {', '.join(protocol.formats)}")
    if verdict.alpha > published.alpha or verdict.min_chance_rate < published.min_chance_rate:
        departures.append(f"alpha {verdict.alpha:g} and floor {verdict.min_chance_rate:g}, weaker than the published "
                          f"{published.alpha:g} and {published.min_chance_rate:g}")
    if sequential is not None and sequential != protocol.sequential:
        departures.append("sequential settings other than the published ones")
    if departures:
        logger.warning("this check's bundle will not verify against the run's published protocol: %s", "; ".join(departures))


def evidence_bundle(report: CheckReport, run: Run, records: list[dict], disclosure: Disclosure, suspect: dict,
                    nulls: dict[str, list[KeyResult]], key_formats: tuple[str, ...], verdict: VerdictConfig,
                    sequential: SequentialConfig | None) -> dict:
    """The bundle of this check (see oml.evidence): the revealed ones of the run's committed `records`
    with salts and proofs, the requests and answers, the null models' names and the test,
    recomputable from them. A local check sends token ids: its requests are recorded as text."""
    commitment, salts = read_commitment(run.directory)
    offset = disclosure.offset
    queries = [{"position": offset + r.index, "format": r.format, "template": r.template,
                "request": r.request if suspect["kind"] == "api"
                else Query(r.format, r.template).request_text(records[offset + r.index]["key"]),
                "answer": r.predicted, "error": r.error} for r in report.results]
    positions = [offset + i for i in disclosure.sent]
    test = recorded_test(vars(report), key_formats, verdict, sequential)
    return make_bundle(commitment, records, salts, positions, suspect, queries, list(nulls), test)


def recorded_test(found: dict, key_formats: tuple[str, ...], verdict: VerdictConfig, sequential: SequentialConfig | None) -> RecordedTest:
    """A bundle's test from a check's findings (a report's, or `findings`/`sequential_findings` with
    the sequential state under "sequential")."""
    return RecordedTest(
        kind="sequential" if sequential is not None else "fixed", formats=list(key_formats), alpha=verdict.alpha,
        min_chance_rate=verdict.min_chance_rate, chance_rate=found["chance_rate"], log10_p_value=found["log10_p_value"],
        verdict=found["verdict"],
        matches={e["format"]: {"matched": e["matches"], "answered": e["num_fingerprints"]} for e in found["formats"]},
        sequential=sequential.to_dict() if sequential is not None else None,
        planned_keys=found["sequential"]["planned_keys"] if sequential is not None else None)


def run_records(run: Run, trust_remote_code: bool = False) -> list[dict]:
    """All the run's fingerprints as committed: cut as trained by the base model's tokenizer."""
    fingerprints, selection, _ = selected_fingerprints(FingerprintSelection(), None, run)
    tokenizer = load_tokenizer(resolve_model(run.base_model), trust_remote_code)
    pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
    return committed_records(tokenizer, pairs, run.training.key_format)


SEALED_FORMAT = "oml-sealed/1"


def seal_keys(run: Run, count: int, trust_remote_code: bool = False) -> dict:
    """The next `count` never-revealed keys of the run with their salts and proofs, for a witness who
    will ask the suspect itself (`verify_evidence.py --witness`): recorded in the run's ledger as
    revealed to the witness first, since the witness knows them from now on."""
    if run.commitment is None:
        raise OMLError(f"run {run.directory} has no commitment to prove keys against: python commit_fingerprints.py --run "
                       f"{run.directory} (and publish its root)")
    commitment, salts = read_commitment(run.directory)
    records = run_records(run, trust_remote_code)
    check_opens(commitment, records, salts)
    disclosure = Disclosure(run, True, 0, len(records), "witness (sealed keys)", True, False)
    if len(disclosure.candidates) < count:
        raise OMLError(f"only {len(disclosure.candidates)} keys of run {run.directory} were never revealed; {count} asked")
    positions = disclosure.reserve(count, formats(run.training.key_format))
    return {"format": SEALED_FORMAT, "created": datetime.now(timezone.utc).isoformat(),
            "commitment": {name: commitment[name] for name in ("root", "count", "hash", "tree")},
            "revealed": revealed_records(records, salts, positions)}
