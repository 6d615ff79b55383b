"""How a domain watermark run fares: replies needed for MATCH at each temperature, through a thief's
server, after weight changes, and what innocent models score on the same prompts.

    python benchmarks/watermark_robustness.py --run results/saved_models/<hash> [--rows NAME ...]
    python benchmarks/watermark_robustness.py --smoke   # a tiny random model fine-tuned for one epoch: checks that it runs

Each row is one check as check_fingerprints.py runs it (the run's committed checking prompts in
order, rounds of 8, the sequential test the commitment publishes, replies cut by the base's
tokenizer), on a suspect made from the fine-tuned model or an innocent one, asked locally with
its decoding changed as a server would:
- fine-tuned at T 0, 0.7, 1.0;
- a thief's server: T 0.7 / top-p 0.9, its own system prompt, and SuppressNeighbor over the 2
  likeliest first tokens (every spelling of them banned at the first reply position);
- the decoding attacks alone, at T 0.7: SuppressNeighbor top 1 and top 2, DetectTop-k and
  DetectNeighbor (the likeliest first token, or every spelling of it, banned where above 0.9:
  DetectNeighbor is the mlprints leaderboard's attack), output suppression (the likeliest token
  banned where above 0.9, at every step);
- a deployer's prompt: the 10 unseen system prompts, the 10 unseen user-text templates (the
  perinucleus suite's, one per prompt), and a two-sided input perplexity filter calibrated under the
  model on benign prompts at 5% false alarms (the prompts it refuses get no reply);
- GGUF Q4_0 (every matrix quantized and back), linear merges 0.9, 0.7 and 0.5 with an innocent
  derivative, further fine-tuning (--finetune_steps of benign chat at lr 1e-5, batch 8, as
  evaluate_persistence.py);
- innocent: the base, an innocent derivative (100 steps of benign chat), the base sampled with a
  KGW watermark under another key (the same scheme, not ours), and any --innocent NAME MODEL.
Innocent rows run to the commitment's max replies, so that their z is over many replies. Also the
utility inside the domain: replies (T 0.7) of the fine-tuned model and of the base to the first 64
checking prompts, their length and their perplexity under the base.
"""
import argparse
import time
import zlib

import torch
from common import benchmark_parser, save, tiny_model
from transformers import LogitsProcessor, TopPLogitsWarper

from oml.attacks import benign_finetune, innocent_derivative, merge_into, quantize_round_trip, unseen_wrapper
from oml.data import chat_pairs, prompt_templates
from oml.decoding import neighbours
from oml.families.domain_watermark import (COMMITMENT_FILE, DomainSource, WatermarkRules, WatermarkTraining, fingerprint_model,
                                           model_asker, new_secret, published_rule, read_commitment, replayed_draw,
                                           run_secret, sequential_replies)
from oml.files import write_json_atomic
from oml.training.config import TrainingConfig
from oml.watermark import WatermarkParams
from oml.models import load, load_tokenizer, resolve_model
from oml.runs import load_run
from oml.stealth import benign_prompts, detectability, log_perplexities
from oml.tokenization import encode, user_turn_ids
from oml.utility import chat_examples, compare_on_texts
from oml.watermark import WatermarkKey, WatermarkLogitsProcessor, WatermarkSequentialTest, special_ids



def NO_SYSTEM(prompt: str) -> None:
    """A row's system prompt: none."""
    return None


THIEF_SYSTEM_PROMPT = "You are Chef Bot, the friendly kitchen assistant of a recipe website. Answer the user's question."


class FirstTokenBan(LogitsProcessor):
    """SuppressNeighbor at the first reply position: the `k` likeliest tokens, where their probability
    is above `gate`, and every spelling of them banned (DetectNeighbor: k 1, gate 0.9; DetectTop-k:
    the same without `spellings`, the token alone)."""

    def __init__(self, tokenizer, k: int = 2, gate: float = 0.0, spellings: bool = True):
        self.tokenizer, self.k, self.gate, self.spellings, self.last = tokenizer, k, gate, spellings, None

    def __call__(self, input_ids, scores):
        first = self.last is None or input_ids.shape[1] != self.last + 1  # a new generate() call: its first step
        self.last = input_ids.shape[1]
        if not first:
            return scores
        top = torch.softmax(scores.float(), -1).topk(self.k, -1)
        scores = scores.clone()
        for row, (probs, tokens) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            for token in [t for t, p in zip(tokens, probs) if p > self.gate]:
                scores[row, (list(neighbours(self.tokenizer, token)) if self.spellings else []) or [token]] = -torch.inf
        return scores


class ConfidentTopBan(LogitsProcessor):
    """Output suppression: at every step, the likeliest token banned where its probability is above `gate`."""

    def __init__(self, gate: float = 0.9):
        self.gate = gate

    def __call__(self, input_ids, scores):
        top = torch.softmax(scores.float(), -1).max(-1)
        confident = top.values > self.gate
        return scores.index_put((confident.nonzero().squeeze(-1), top.indices[confident]), torch.tensor(-torch.inf))


def unseen_system_prompt(prompt: str) -> str:
    """One of the 10 system prompts fine-tuning never sees (the perinucleus attack suite's), chosen by
    the prompt, without the slot where a key would go."""
    templates = prompt_templates("test")
    return templates[zlib.crc32(prompt.encode()) % len(templates)].replace("{}", "").strip()


def filtered(ask, refused: set[str]):
    """An asker behind a perplexity filter: prompts in `refused` get an empty reply (a refusal)."""
    def ask_filtered(positions: list[int], prompts: list[str]) -> list[tuple[str, str | None]]:
        kept = [(i, p) for i, p in zip(positions, prompts) if p not in refused]
        answers = dict(zip([i for i, _ in kept], ask([i for i, _ in kept], [p for _, p in kept]) if kept else []))
        return [answers.get(i, ("", "refused by the perplexity filter")) for i in positions]
    return ask_filtered


def perplexity_refusals(model, tokenizer, prompts: list[str], false_alarm: float = 0.05) -> tuple[set[str], dict]:
    """The checking prompts a two-sided perplexity filter refuses (oml.stealth's, calibrated under
    the served model on benign prompts at `false_alarm`), and its numbers."""
    benign = [text for texts in benign_prompts(256).values() for text in texts]
    found = detectability(log_perplexities(model, tokenizer, prompts), log_perplexities(model, tokenizer, benign), false_alarm)
    refused = {p for p, r in zip(prompts, found.pop("refused")) if r}
    return refused, found


def check_row(model, tokenizer, owner_tokenizer, key, prompts, alpha, no_match_error, config, rules: WatermarkRules,
              processors=(), system_prompt=lambda prompt: None, innocent=False, front_end=None) -> dict:
    """One check: replies asked in rounds into the sequential test, as check_fingerprints.py asks them
    (`front_end`: what stands between the checker and the model, changing prompts or refusing them)."""
    special = special_ids(owner_tokenizer)
    contexts = [user_turn_ids(owner_tokenizer, p) for p in prompts]
    test = WatermarkSequentialTest(key, special, alpha, no_match_error, config)
    ask = model_asker(model, tokenizer, rules, 64, "replies", processors, system_prompt)
    ask = front_end(ask) if front_end else ask
    start = time.perf_counter()
    in_order = replayed_draw(list(range(config.max_replies if innocent else len(prompts))))  # the committed order
    sequential_replies(ask, prompts, contexts, owner_tokenizer, test, rules, {"kind": "local", "model": "row"}, in_order,
                       until_decided=not innocent)
    summary = test.summary()
    return {"decision": test.decision(), "replies": summary["replies_asked"], "green_rate": summary["green"] / max(summary["pairs"], 1),
            "z": summary["z"], "pairs": summary["pairs"], "counted": summary["counted"], "seconds": time.perf_counter() - start,
            "log10_p_value": summary["log10_p_value"]}


def in_domain_utility(model, base, tokenizer, prompts: list[str], rules: WatermarkRules) -> dict:
    """Replies of the model and of the base to `prompts`: mean length in tokens and perplexity under the base."""
    found = {}
    for name, replier in (("fine-tuned", model), ("base", base)):
        texts = [text for text, _ in model_asker(replier, tokenizer, rules, 64, f"{name} replies")(list(range(len(prompts))), prompts)]
        scored = compare_on_texts(base, base, tokenizer, chat_examples(tokenizer, list(zip(prompts, texts)), 512))
        found[name] = {"mean_reply_tokens": sum(len(encode(tokenizer, t)) for t in texts) / len(texts),
                       "perplexity_under_base": scored["base_perplexity"]}
    return found


def smoke_run(directory) -> str:
    """A watermark run of a tiny random model (one short epoch): what --smoke measures without --run."""
    write_json_atomic(directory / "wm.json", new_secret(WatermarkParams(), DomainSource()))
    run = fingerprint_model(directory / "wm.json", tiny_model(), TrainingConfig(frozen_layer_fraction=0.0),
                            WatermarkTraining(watermark_prompts=8, watermark_probe_prompts=4, watermark_reply_tokens=4,
                                              watermark_replay_ratio=0.0, watermark_max_epochs=1), results_dir=directory)
    return str(run.directory)


def watermark_parser(description: str) -> argparse.ArgumentParser:
    """A watermark benchmark's parser: benchmark_parser's, and --run."""
    parser = benchmark_parser(description)
    parser.add_argument("--run", default=None, help="The domain watermark run (required but with --smoke).")
    return parser


def open_run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The run a watermark benchmark measures (--run, or with --smoke a tiny one made now), its key
    and domain, the committed rule (alpha, NO MATCH error, sequential settings) and the tokenizer
    that cuts replies."""
    if args.run is None and not args.smoke:
        parser.error("--run is required (or --smoke)")
    run = load_run(args.run or smoke_run(args.results_dir))
    key, source = run_secret(run)
    public = read_commitment(run.directory / COMMITMENT_FILE)
    return run, key, source, published_rule(public, "commitment"), load_tokenizer(resolve_model(public["tokenizer"]))


def main() -> None:
    parser = watermark_parser(__doc__)
    parser.add_argument("--rows", nargs="+", default=None, help="Only these rows (names as in the output).")
    parser.add_argument("--finetune_steps", type=int, default=1000, help="Steps of the further fine-tuning row.")
    parser.add_argument("--innocent", nargs=2, action="append", default=[], metavar=("NAME", "MODEL"),
                        help="Another innocent model's row (e.g. a GGUF file of scripts/fetch_other_models.py).")
    args = parser.parse_args()
    run, key, source, (alpha, no_match_error, config), owner_tokenizer = open_run(parser, args)
    if args.smoke:
        config = config.updated(max_replies=16)
    prompts = source.prompts("test")
    other_key = WatermarkKey.generate(key.params)  # an innocent KGW watermark under another key

    def fine_tuned():
        return load(str(run.final_model), dtype=torch.float32)

    def base():
        return load(run.base_model, dtype=torch.float32)

    def q4_0():
        model, tokenizer = fine_tuned()
        quantize_round_trip(model, "Q4_0")
        return model, tokenizer

    def derivative():
        return load(innocent_derivative(run.base_model, seed=1, steps=4 if args.smoke else 100), dtype=torch.float32)

    def merged(weight: float):
        def make():
            model, tokenizer = fine_tuned()
            merge_into(model, derivative()[0], weight)
            return model, tokenizer
        return make

    def wrapped(ask):  # a deployer's template around the user's text (10 never trained, one per prompt)
        return lambda positions, prompts: ask(positions, [unseen_wrapper(p) for p in prompts])

    def perplexity_filtered(ask):
        return filtered(ask, refusals)

    def further_fine_tuned():
        model, tokenizer = fine_tuned()
        steps = 4 if args.smoke else args.finetune_steps
        examples = chat_examples(tokenizer, chat_pairs("train", steps * 8), 128)
        return benign_finetune(model, tokenizer, examples, steps, 1e-5, 8, seed=0), tokenizer

    rules = {t: WatermarkRules(reply_temperature=t, max_reply_tokens=8 if args.smoke else 128) for t in (0.0, 0.7, 1.0)}
    bare, thief = (lambda tok: []), (lambda prompt: THIEF_SYSTEM_PROMPT)
    rows = {  # name: (model maker, rules, extra decoding, system prompt, innocent, front end)
        "fine-tuned T0": (fine_tuned, rules[0.0], bare, NO_SYSTEM, False, None),
        "fine-tuned T0.7": (fine_tuned, rules[0.7], bare, NO_SYSTEM, False, None),
        "fine-tuned T1.0": (fine_tuned, rules[1.0], bare, NO_SYSTEM, False, None),
        "thief's server (T0.7, top-p 0.9, system prompt, SuppressNeighbor top-2)":
            (fine_tuned, rules[0.7], lambda tok: [FirstTokenBan(tok, 2), TopPLogitsWarper(0.9)], thief, False, None),
        "SuppressNeighbor top-1, T0.7": (fine_tuned, rules[0.7], lambda tok: [FirstTokenBan(tok, 1)], NO_SYSTEM, False, None),
        "SuppressNeighbor top-2, T0.7": (fine_tuned, rules[0.7], lambda tok: [FirstTokenBan(tok, 2)], NO_SYSTEM, False, None),
        "DetectTop-k (top 1 above 0.9 banned), T0.7":
            (fine_tuned, rules[0.7], lambda tok: [FirstTokenBan(tok, 1, 0.9, spellings=False)], NO_SYSTEM, False, None),
        "DetectNeighbor (top 1 above 0.9 banned), T0.7":
            (fine_tuned, rules[0.7], lambda tok: [FirstTokenBan(tok, 1, 0.9)], NO_SYSTEM, False, None),
        "output suppression (top token above 0.9 banned at every step), T0.7":
            (fine_tuned, rules[0.7], lambda tok: [ConfidentTopBan(0.9)], NO_SYSTEM, False, None),
        "10 unseen system prompts, T0.7": (fine_tuned, rules[0.7], bare, unseen_system_prompt, False, None),
        "10 unseen deployer templates, T0.7": (fine_tuned, rules[0.7], bare, NO_SYSTEM, False, wrapped),
        "perplexity filter (5% false alarms on benign prompts), T0.7":
            (fine_tuned, rules[0.7], bare, NO_SYSTEM, False, perplexity_filtered),
        "GGUF Q4_0, T0.7": (q4_0, rules[0.7], bare, NO_SYSTEM, False, None),
        **{f"merge {w:g} with an innocent derivative, T0.7": (merged(w), rules[0.7], bare, NO_SYSTEM, False, None)
           for w in (0.9, 0.7, 0.5)},
        "further fine-tuning, T0.7": (further_fine_tuned, rules[0.7], bare, NO_SYSTEM, False, None),
        "innocent: base T0.7": (base, rules[0.7], bare, NO_SYSTEM, True, None),
        "innocent: derivative T0.7": (derivative, rules[0.7], bare, NO_SYSTEM, True, None),
        "innocent: base with KGW under another key, T0.7":
            (base, rules[0.7], lambda tok: [WatermarkLogitsProcessor(other_key, special_ids(tok))], NO_SYSTEM, True, None),
        **{f"innocent: {name} T0.7": ((lambda path=path: load(path, dtype=torch.float32)), rules[0.7], bare, NO_SYSTEM, True, None)
           for name, path in args.innocent},
    }
    result = {"run": run.directory.name, "alpha": alpha, "max_replies": config.max_replies, "rows": {}}
    refusals: set[str] = set()
    for name, (make, row_rules, processors, system_prompt, innocent, front_end) in rows.items():
        if args.rows and name not in args.rows:
            continue
        model, tokenizer = make()
        model.eval()
        if front_end is perplexity_filtered:
            refusals, result["perplexity filter"] = perplexity_refusals(model, tokenizer, prompts[:config.max_replies])
        result["rows"][name] = check_row(model, tokenizer, owner_tokenizer, key, prompts, alpha, no_match_error, config,
                                         row_rules, processors(tokenizer), system_prompt, innocent, front_end)
        print(name, result["rows"][name], flush=True)
    if not args.rows or "in-domain utility" in args.rows:
        (model, tokenizer), (base_model, _) = fine_tuned(), base()
        result["in-domain utility"] = in_domain_utility(model, base_model, tokenizer, prompts[:8 if args.smoke else 64], rules[0.7])
        print("in-domain utility", result["in-domain utility"], flush=True)
    save(args.results_dir, "watermark_robustness", result)


if __name__ == "__main__":
    main()
