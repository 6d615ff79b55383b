"""What fingerprints survive: the checker's accuracy and verdict after what deployers and thieves do.

    python evaluate_robustness.py --run results/saved_models/<hash> --output_json robustness.json --plot robustness.png

One row per transformation of the fingerprinted model: bf16 and fp16 casts; GGUF quantization
round trips (Q8_0, Q5_0, Q4_0, with the `gguf` package's quantizers); sampling instead of
greedy decoding; the 10 unseen system prompts (chat: as the system message); linear merges
with an innocent derivative of the base model; full and LoRA fine-tuning on benign chat; the
output-suppression attack (serve the second token whenever the top one is more likely than a
gate); the decoding attacks of "Are Robust LLM Fingerprints Adversarially Robust?" (arXiv
2509.26598: DetectTop-k, SuppressNeighbor, DetectNeighbor, SuppressLookahead; and SuppressNeighbor
over the two likeliest tokens, a thief's answer to keys with two responses); front ends that
rewrite the user's text (stripped, trailing newline, whitespace collapsed, lower case, inside a
deployer's template, inside 10 wrappers fine-tuning never sees); and MEraser (arXiv 2506.12551:
fine-tuning on mismatched, then on clean chat), full and LoRA. Each row gives the accuracy per key format, the verdict (null model: the
base, under the same decoding and front end) and what the transformation cost: KL from the base
on held-out chat for weight changes, the share of benign tokens a decoding attack alters (of
the first reply tokens, for those that act only there), the share of chat messages a front end
changes. Rows that change the weights also get the reply measure of evaluate_utility.py against
the base (replies of at most 3 tokens, first reply token the base's): does the model the attacker
ends with still answer?
"""
import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from oml import cli
from oml.attacks import (FRONT_ENDS, GGUF_TYPES, benign_finetune, innocent_derivative, lora_finetune, meraser, meraser_examples,
                         merge_into, quantize_round_trip, rewritten_keys)
from oml.checking import KeyResult, check_model, queries_for
from oml.decoding import GREEDY, Decoding, LookaheadSuppression, NeighbourSuppression, Sampling, TopKSuppression
from oml.data import chat_pairs, prompt_templates, texts_from
from oml.files import check_writable, write_atomically
from oml.fingerprints import FingerprintSelection, query_formats, responses_per_key, selected_fingerprints
from oml.models import load
from oml.replies import ReplyMeasure, ReplySettings, fingerprint_keys
from oml.settings import (OPEN_UNIT_INTERVAL, POSITIVE_FLOAT, POSITIVE_INT, UNIT_INTERVAL, Settings, at_least, at_least_float,
                          setting)
from oml.stats import VerdictConfig, findings, format_p_value
from oml.tokenization import fingerprint_pairs
from oml.utility import altered_share, chat_examples, compare_on_texts, text_examples

logger = logging.getLogger("evaluate_robustness")

# Sampling below this is greedy decoding in all but name, and far below it logits / T overflow to inf (NaN probabilities).
MIN_TEMPERATURE = 0.01


@dataclass
class Attack:
    """A transformation: of the weights (`transform` returns the changed model), of decoding, of the
    prompt (system prompts), or of the key's text (`front_end`, a name in `FRONT_ENDS`)."""
    name: str
    transform: Callable | None = None
    decoding: Decoding = GREEDY
    system_prompts: bool = False
    front_end: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RobustnessSettings(Settings):
    """The rows evaluate_robustness.py runs, how hard each transformation is, and what prices it."""
    base_model: str | None = setting(
        None, "The model before fingerprinting: the null model and the parent of the merge partner (default: the --run's "
              "base model, else the embedded model).", kind=str)
    attacks: tuple[str, ...] | None = setting(None, "Only these rows (names as printed); default: all.", kind=str, nargs="+")
    merge_weights: tuple[float, ...] = setting(
        (0.9, 0.7, 0.5), "Weight of the fingerprinted model in linear merges with an innocent derivative of the base.",
        UNIT_INTERVAL, nargs="+")
    temperatures: tuple[float, ...] = setting((0.7, 1.0), "Sampling temperatures a deployer might serve at.",
                                              at_least_float(MIN_TEMPERATURE), nargs="+")
    finetune_learning_rates: tuple[float, ...] = setting((1e-5, 1e-4), "Learning rates of the full and LoRA fine-tuning rows.",
                                                         POSITIVE_FLOAT, nargs="+")
    finetune_steps: int = setting(200, "Steps of each fine-tuning row.", POSITIVE_INT)
    finetune_batch_size: int = setting(8, "Examples per fine-tuning step.", POSITIVE_INT)
    suppression_gate: tuple[float, ...] = setting(
        (0.9,), "Output suppression serves the second token wherever the top one is likelier than this.", OPEN_UNIT_INTERVAL,
        nargs="+")
    meraser_erase_samples: int = setting(400, "MEraser's phase 1 examples: messages each answered with another exchange's reply.",
                                         at_least(2))
    meraser_key_like_share: float = setting(
        0.5, "Share of MEraser's phase 1 messages that are random words made and asked like our random-word keys (an "
             "attacker who knows how keys are made; 0: the paper's attack).", UNIT_INTERVAL)
    meraser_recover_samples: int = setting(400, "MEraser's phase 2 examples: clean chat exchanges.", POSITIVE_INT)
    meraser_erase_steps: int = setting(
        250, "MEraser's phase 1 steps of --finetune_batch_size examples (5 epochs of 400, as the authors' code).", POSITIVE_INT)
    meraser_recover_steps: int = setting(100, "MEraser's phase 2 steps (2 epochs of 400, as the authors' code).", POSITIVE_INT)
    meraser_full_learning_rate: float = setting(1e-4, "Learning rate of both phases of the full fine-tuning MEraser row.",
                                                POSITIVE_FLOAT)
    meraser_lora_learning_rate: float = setting(
        5e-4, "Learning rate of both phases of the LoRA MEraser row (the authors' code's).", POSITIVE_FLOAT)
    num_texts: int = setting(16, "Held-out chat texts for the utility column.", POSITIVE_INT)
    num_replies: int = setting(
        256, "Held-out chat exchanges: their first reply tokens price the decoding attacks that act only there, their "
             "messages the front ends.", POSITIVE_INT)
    max_length: int = setting(128, "Tokens per text and fine-tuning example.", at_least(2))
    batch_size: int = setting(64, "Keys per forward pass.", POSITIVE_INT)
    seed: int = setting(0, "Seed of sampling and of the fine-tuning data order.")
    plot: str | None = setting(None, "Also draw the rows as a PNG bar chart.", kind=str)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_settings(parser, cli.FingerprintedModel)
    cli.add_fingerprint_args(parser)
    cli.add_settings(parser, RobustnessSettings)
    cli.add_settings(parser, VerdictConfig)
    cli.add_settings(parser, ReplySettings, num_reply_prompts=60)
    cli.add_output_args(parser, "the rows")
    cli.add_common_args(parser)
    return parser


def parse_args():
    parser = build_parser()
    args = cli.parse_evaluation_args(parser, "evaluate_robustness.py")
    names = [attack.name for attack in attacks(args)]
    unknown = [name for name in args.attacks or () if name not in names]
    if unknown:
        parser.error(f"unknown --attacks {', '.join(map(repr, unknown))}; the rows are: {', '.join(map(repr, names))}")
    cli.check_output(args)
    if args.plot:
        check_writable(args.plot, args.overwrite)
    return args


def attacks(args) -> list[Attack]:
    """Every row, in order; fine-tuning data and the merge partner are made only when a row runs."""
    def finetune(lr: float, lora: bool) -> Callable:
        def run(model, tokenizer):
            pairs = chat_pairs("train", args.finetune_steps * args.finetune_batch_size)
            examples = chat_examples(tokenizer, pairs, args.max_length)
            train = lora_finetune if lora else benign_finetune
            return train(model, tokenizer, examples, args.finetune_steps, lr, args.finetune_batch_size, args.seed)
        return run

    def merge(weight: float) -> Callable:
        def run(model, tokenizer):
            partner, _ = load(innocent_derivative(args.base_model, seed=0), dtype=torch.float32)
            merge_into(model, partner, weight)
            return model
        return run

    def erase(lr: float, lora: bool) -> Callable:
        def run(model, tokenizer):
            examples = meraser_examples(tokenizer, args.meraser_erase_samples, args.meraser_recover_samples,
                                        args.meraser_key_like_share, args.max_length, args.seed)
            return meraser(model, tokenizer, *examples, (args.meraser_erase_steps, args.meraser_recover_steps), lr,
                           args.finetune_batch_size, args.seed, lora)
        return run

    def quantize(qtype: str) -> Callable:
        return lambda model, tokenizer: (quantize_round_trip(model, qtype), model)[1]

    def cast(dtype: torch.dtype) -> Callable:
        return lambda model, tokenizer: model.to(dtype)

    rows = [Attack("none"), Attack("10 unseen system prompts", system_prompts=True),
            Attack("bf16", cast(torch.bfloat16)), Attack("fp16", cast(torch.float16))]
    rows += [Attack(f"GGUF {qtype}", quantize(qtype)) for qtype in GGUF_TYPES]
    rows += [Attack(f"sampling T={t:g}", decoding=Sampling(temperature=t, seed=args.seed)) for t in args.temperatures]
    rows += [Attack(f"merge {w:g} with a derivative", merge(w)) for w in args.merge_weights]
    rows += [Attack(f"{'LoRA' if lora else 'full'} fine-tune lr {lr:g}", finetune(lr, lora))
             for lora in (False, True) for lr in args.finetune_learning_rates]
    rows += [Attack(f"output suppression gate {g:g}", decoding=TopKSuppression(gate=g, num_tokens=None)) for g in args.suppression_gate]
    rows += [Attack("DetectTop-k k=1 gate 0.9", decoding=TopKSuppression()),
             Attack("SuppressNeighbor", decoding=NeighbourSuppression()),
             Attack("SuppressNeighbor top 2", decoding=NeighbourSuppression(candidate_set_size=2)),  # against 2 responses a key
             Attack("DetectNeighbor gate 0.9", decoding=NeighbourSuppression(add_threshold=0.9, generation_threshold=0.9)),
             Attack("SuppressLookahead", decoding=LookaheadSuppression())]
    rows += [Attack(f"front end: {name}", front_end=name) for name in FRONT_ENDS]
    rows += [Attack(f"MEraser full lr {args.meraser_full_learning_rate:g}", erase(args.meraser_full_learning_rate, lora=False)),
             Attack(f"MEraser LoRA lr {args.meraser_lora_learning_rate:g}", erase(args.meraser_lora_learning_rate, lora=True))]
    return rows


def row_findings(results: list[KeyResult], base: list[KeyResult], key_formats, base_name: str, verdict_config: VerdictConfig,
                 system_prompts: bool) -> dict:
    """Verdict and accuracies of one row. Under system prompts each template is a deployment of its
    own: accuracy is the mean over them, the verdict the weakest one's."""
    if not system_prompts:
        return findings(results, {base_name: base}, key_formats, verdict_config)
    templates = sorted({r.template for r in results if r.template is not None})
    per_template = [findings([replace(r, template=None) for r in results if r.template == t], {base_name: base},
                             key_formats, verdict_config) for t in templates]
    weakest = max(per_template, key=lambda e: e["log10_p_value"])
    formats = [{"format": f, "accuracy": sum(e["formats"][i]["accuracy"] for e in per_template) / len(per_template)}
               for i, f in enumerate(key_formats)]
    return {**weakest, "formats": formats}


def main() -> None:
    args = parse_args()
    fingerprints, selection, fingerprints_file = selected_fingerprints(cli.settings_from(FingerprintSelection, args),
                                                                       args.fingerprints_file_path, args.run)
    verdict_config = cli.settings_from(VerdictConfig, args).for_responses(responses_per_key(fingerprints))
    base, tokenizer = load(args.base_model, args.trust_remote_code, dtype=torch.float32)
    key_formats = query_formats(args.query_format, fingerprints, tokenizer, args.run)
    bare = queries_for(key_formats)
    pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
    texts = text_examples(tokenizer, texts_from("chitchat", "train", "text", "eval", args.num_texts), args.max_length)
    chat = chat_pairs("eval", args.num_replies)
    benign = {"texts": texts, "replies": chat_examples(tokenizer, chat, args.max_length), "messages": [m for m, _ in chat]}
    reply_settings = cli.settings_from(ReplySettings, args)
    replies = (ReplyMeasure(base, tokenizer, reply_settings, fingerprint_keys(fingerprints))
               if reply_settings.num_reply_prompts else None)
    base_results: dict[tuple[Decoding, str | None], list[KeyResult]] = {}
    rows = []
    for attack in [row for row in attacks(args) if not args.attacks or row.name in args.attacks]:
        logger.info("Attack: %s", attack.name)
        model, _ = load(args.model_path, args.trust_remote_code, dtype=torch.float32)
        if attack.transform:
            model = attack.transform(model, tokenizer)
        asked = rewritten_keys(tokenizer, pairs, FRONT_ENDS[attack.front_end]) if attack.front_end else pairs
        queries = bare + (queries_for(key_formats, prompt_templates("test")) if attack.system_prompts else [])
        results = check_model(model, tokenizer, asked, queries, args.batch_size, description=attack.name, decoding=attack.decoding)
        null = (attack.decoding, attack.front_end)
        if null not in base_results:
            base_results[null] = check_model(base, tokenizer, asked, bare, args.batch_size, description="base",
                                             decoding=attack.decoding)
        found = row_findings(results, base_results[null], key_formats, args.base_model, verdict_config, attack.system_prompts)
        cost, cost_measure = attack_cost(attack, model, base, tokenizer, benign)
        rows.append({"attack": attack.name, **{f"accuracy_{e['format']}": e["accuracy"] for e in found["formats"]},
                     "verdict": found["verdict"], "log10_p_value": found["log10_p_value"],
                     "expected_rate": (100 * sum(r.response_probability for r in results if r.template is None)
                                       / len([r for r in results if r.template is None])) if attack.decoding.temperature else None,
                     "cost": cost, "cost_measure": cost_measure,
                     "replies": replies.compare(model, attack.name) if replies and changes_weights(attack) else None})
        del model
    print_rows(rows, key_formats)
    cli.write_output(args, {"model": args.model_path, "fingerprints_file": fingerprints_file,
                            "num_fingerprints": len(pairs), "rows": rows})
    if args.plot:
        plot(rows, key_formats, args.plot, args.overwrite)


def changes_weights(attack: Attack) -> bool:
    """Whether a row serves other weights the ordinary way (the untouched model included): the rows the reply measure prices."""
    return attack.decoding == GREEDY and not attack.front_end and not attack.system_prompts


def attack_cost(attack: Attack, model, base, tokenizer, benign: dict) -> tuple[float | None, str | None]:
    """What a row costs whoever does it, and what that number is: the share of held-out chat
    messages a front end changes; KL from the base on held-out chat texts for weight changes; for
    a decoding attack, the share of benign tokens it serves differently from greedy decoding: of
    every token of the chat texts, or, for one that acts only on the first tokens of a reply, of
    those tokens of held-out chat replies (sampling: none, its expected match rate says more)."""
    if attack.front_end:
        rewrite = FRONT_ENDS[attack.front_end]
        return sum(rewrite(m) != m for m in benign["messages"]) / len(benign["messages"]), "chat messages changed"
    decoding = attack.decoding
    if decoding == GREEDY:
        return compare_on_texts(model.float(), base, tokenizer, benign["texts"])["mean_kl_from_base"], "KL from base"
    if decoding.temperature:
        return None, None
    if decoding.num_tokens is None:
        return altered_share(model, tokenizer, benign["texts"], decoding), "benign tokens altered"
    return altered_share(model, tokenizer, benign["replies"], decoding), f"reply tokens altered (first {decoding.num_tokens})"


def print_rows(rows: list[dict], key_formats) -> None:
    print(f"{'attack':<34} " + " ".join(f"{f:>8}" for f in key_formats) + f" {'p-value':>10} {'verdict':>9} {'cost':>22}"
          + f" {'short replies':>13} {'1st token':>9}")
    for row in rows:
        cost = "" if row["cost"] is None else f"{row['cost']:.4f} {row['cost_measure']}"
        greedy = (row["replies"] or {}).get("greedy")
        replies = f" {greedy['short_reply_share']:>13.3f} {greedy['first_token_agreement']:>9.3f}" if greedy else ""
        print(f"{row['attack']:<34} " + " ".join(f"{row['accuracy_' + f]:7.2f}%" for f in key_formats)
              + f" {format_p_value(row['log10_p_value']):>10} {row['verdict']:>9} {cost:>22}{replies}")
    survived = sum(row["verdict"] == "MATCH" for row in rows)
    print(f"Verdict MATCH after {survived} of {len(rows)} attacks", flush=True)


def plot(rows: list[dict], key_formats, path: str, overwrite: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.2))
    height = 0.8 / len(key_formats)
    for i, f in enumerate(key_formats):
        ax.barh([y + i * height for y in range(len(rows))], [row["accuracy_" + f] for row in rows], height=height, label=f"{f} keys")
    for y, row in enumerate(rows):
        ax.text(101, y + 0.2, row["verdict"], fontsize=7, va="center", color="green" if row["verdict"] == "MATCH" else "red")
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(rows))], [row["attack"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 115), xlabel="fingerprints matched (%)", title="Fingerprints after each attack")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a verdict
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), overwrite)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
