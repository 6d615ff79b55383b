"""How many checks one domain watermark supports when each evidence bundle reveals the green lists
of the contexts its test counted and the suspect's operator scrubs every revealed context from then
on (issue 41); and what signing the contexts costs.

    python benchmarks/watermark_reuse.py --run results/saved_models/<hash> [--checks 10] [--pool 512]
    python benchmarks/watermark_reuse.py --smoke   # a tiny random model fine-tuned for one epoch: checks that it runs

A pool of replies: the fine-tuned model's replies (T 0.7, 128 tokens, as check_fingerprints.py asks
them) to the run's first --pool checking prompts, in committed order. Checks then take the pool's
replies in order (each asks prompts no earlier check asked, as the run's ledger makes it), and test
them as check_fingerprints.py does: rounds of 8, the committed sequential rule, and tokens after a
context revealed by an earlier check's bundle left out. The thief serves red tokens after every
revealed context; a check leaves those tokens out, so scrubbing reaches what it counts only through
the token after a scrubbed one, whose context changes: not modelled (the pool is the model's own text).

Per check: the verdict and the replies it needed, the contexts its bundle reveals, and by then the
share of the scored tokens of the rest of the pool (fresh replies) that follow a revealed context.
"""
import json
import time
from pathlib import Path

import torch
from common import save
from watermark_robustness import open_run, watermark_parser

from oml.families.domain_watermark import WatermarkRules, model_asker
from oml.files import write_json_atomic
from oml.models import load
from oml.tokenization import encode, user_turn_ids
from oml.watermark import WatermarkKey, WatermarkSequentialTest, next_selection, reply_pairs, special_ids


def simulate_checks(pool: list[list[int]], contexts: list[list[int]], key: WatermarkKey, special: frozenset[int],
                    rule: tuple, checks: int, classes: int = 1) -> list[dict]:
    """Checks one after another over the pool's replies in order, each counting the first public
    class of contexts no earlier check revealed (`next_selection`, as check_fingerprints.py picks it),
    leaving out revealed contexts, and revealing the contexts it counted."""
    revealed, used, rows = set(), 0, []
    for number in range(1, checks + 1):
        selection = next_selection(classes, revealed)
        test = WatermarkSequentialTest(key, special, *rule, selection=selection)
        while (step := test.next_round()) and used < len(pool):
            test.add(pool[used:used + step], contexts[used:used + step])
            used += len(pool[used:used + step])
        summary, new = test.summary(), test.scored_contexts()
        revealed |= set(new)
        rows.append({"check": number, "context_class": selection.context_class,
                     "decision": test.decision() or "undecided: pool used up", "replies": summary["replies_asked"],
                     "green_rate": summary["green"] / max(summary["pairs"], 1), "pairs": summary["pairs"],
                     "counted_token_share": summary["tokens"] / max(summary["tokens"] + summary["excluded_tokens"], 1),
                     "contexts_revealed": len(new), "contexts_revealed_total": len(revealed),
                     "fresh_tokens_after_revealed": revealed_share(pool[used:], contexts[used:], revealed,
                                                                   key.params.context_width, special)})
        if test.decision() is None:
            break
    return rows


def pool_replies(run, prompts: list[str], path: Path) -> tuple[list[str], float]:
    """The fine-tuned model's replies to `prompts` (and the seconds they took), kept in `path` for
    later simulations of the same run."""
    if path.exists():
        kept = json.loads(path.read_text())
        if kept["run"] == run.directory.name and kept["prompts"] == len(prompts):
            return kept["texts"], kept["seconds"]
    model, tokenizer = load(str(run.final_model), dtype=torch.float32)
    start = time.perf_counter()
    texts = [text for text, _ in model_asker(model, tokenizer, WatermarkRules(), 64, "pool replies")(
        list(range(len(prompts))), prompts)]
    seconds = time.perf_counter() - start
    write_json_atomic(path, {"run": run.directory.name, "prompts": len(prompts), "texts": texts, "seconds": seconds},
                      overwrite=True)
    return texts, seconds


def revealed_share(replies: list[list[int]], contexts: list[list[int]], revealed: set, width: int,
                   special: frozenset[int]) -> float | None:
    """The share of the replies' scored tokens whose context is revealed (None: no replies left)."""
    pairs = [pair for reply, context in zip(replies, contexts) for pair in reply_pairs(reply, context, width, special)]
    return sum(context in revealed for context, _ in pairs) / len(pairs) if pairs else None


def signing_cost(key: WatermarkKey, count: int = 2000) -> dict:
    """Seconds per context signature (fresh contexts), and for one per vocabulary entry (width 1)."""
    start = time.perf_counter()
    for token in range(10 ** 6, 10 ** 6 + count):
        key.sign((token,) * key.params.context_width)
    per = (time.perf_counter() - start) / count
    return {"seconds_per_signature": per, "seconds_for_49152_contexts": per * 49152}


def main() -> None:
    parser = watermark_parser(__doc__)
    parser.add_argument("--checks", type=int, default=10, help="Checks to simulate, one after another.")
    parser.add_argument("--pool", type=int, default=512, help="Checking prompts the fine-tuned model replies to.")
    parser.add_argument("--classes", type=int, default=None, help="Public classes of contexts (default: the run's "
                                                                   "--context_classes); 1: every check counts every unrevealed context.")
    args = parser.parse_args()
    run, key, source, rule, tokenizer = open_run(parser, args)
    prompts = source.prompts("test")[:16 if args.smoke else args.pool]
    texts, pool_seconds = pool_replies(run, prompts, Path(args.results_dir) / f"watermark_reuse_pool_{run.directory.name}.json")
    pool, contexts = [encode(tokenizer, t) for t in texts], [user_turn_ids(tokenizer, p) for p in prompts]
    classes = args.classes or key.params.context_classes
    checks = simulate_checks(pool, contexts, key, special_ids(tokenizer), rule, args.checks, classes)
    name = f"watermark_reuse{'_smoke' if args.smoke else ''}_{classes}_classes"
    save(args.results_dir, name, {"run": run.directory.name, "context_width": key.params.context_width, "classes": classes,
                                  "pool_replies": len(pool), "pool_seconds": pool_seconds, "checks": checks,
                                  "signing": signing_cost(key, 50 if args.smoke else 2000)})


if __name__ == "__main__":
    main()
