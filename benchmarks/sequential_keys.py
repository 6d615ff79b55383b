"""How many keys a sequential check reveals: for a fingerprinted model and for innocent ones.

    python benchmarks/sequential_keys.py --run RUN [--api_base URL --api_model NAME] [--orders 20] [--smoke]

Asks every key of the run once in every format (the fingerprinted model over an OpenAI-compatible
server when --api_base is given, else locally; the base model and an innocent derivative of it
locally), then replays the sequential check (today's defaults: rounds of 4, alternative rate 0.9,
NO MATCH below 1e-3, alpha 1e-6, the base as null model) over --orders random orders of the keys.
Reports per model the verdicts and the keys revealed until the verdict (median, mean, max), and
how many independent checks a run of 1,024 keys supports at the fingerprinted model's mean. The
run's ledger is not touched: this measures the test, it does not spend keys.
"""
import random
import statistics

from common import benchmark_model, benchmark_parser, save

from oml.attacks import innocent_derivative
from oml.checking import KeyResult, check_named_model, queries_for
from oml.fingerprints import FingerprintSelection, query_formats, selected_fingerprints
from oml.models import load_tokenizer, resolve_model
from oml.remote import ApiConfig, api_requests, check_over_api
from oml.runs import load_run
from oml.sequential import SequentialConfig, SequentialTest
from oml.stats import DEFAULT_MIN_CHANCE_RATE, null_chance_rate
from oml.tokenization import fingerprint_pairs

RUN_OF_1024 = 1024


def answers_by_key(results: list[KeyResult], count: int, key_formats: tuple[str, ...]) -> list[dict[str, bool | None]]:
    """Per key, its match in each format (bare keys)."""
    table = [dict.fromkeys(key_formats) for _ in range(count)]
    for r in results:
        if r.template is None:
            table[r.index][r.format] = r.match
    return table


def replay(answers: list[dict], order: list[int], rate: float, alpha: float, key_formats: tuple[str, ...],
           config: SequentialConfig) -> tuple[str, int]:
    """The sequential check's verdict and keys revealed, asking keys in `order`, a round at a time."""
    test = SequentialTest(rate, alpha, key_formats, config, len(order))
    test.replay([answers[i] for i in order])
    return test.decision(), test.keys_seen


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--run", required=False, help="The fingerprinted run (default with --smoke: a tiny untrained one).")
    parser.add_argument("--api_base", default=None, help="Ask the fingerprinted model over this OpenAI-compatible server.")
    parser.add_argument("--api_model", default=None)
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1e-6)
    parser.add_argument("--derivative_steps", type=int, default=100)
    args = parser.parse_args()
    config = SequentialConfig()
    if args.smoke:
        fingerprinted = base = benchmark_model(True)
        records = [{"key": f"key number {i} here", "response": " yes"} for i in range(12)]
        fingerprints, selection, _ = selected_fingerprints(FingerprintSelection(), records)
        key_formats, derivative = ("raw",), base
    else:
        run = load_run(args.run)
        fingerprints, selection, _ = selected_fingerprints(FingerprintSelection(), None, run)
        fingerprinted, base = str(run.final_model), run.base_model
        key_formats = query_formats(None, fingerprints, None, run)
        derivative = innocent_derivative(base, seed=0, steps=args.derivative_steps)

    def local(model: str) -> list[KeyResult]:
        return check_named_model(model, fingerprints, selection, queries_for(key_formats))

    if args.api_base:
        tokenizer = load_tokenizer(resolve_model(base))
        pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
        suspect = check_over_api(ApiConfig(api_base=args.api_base, api_model=args.api_model),
                                 api_requests(tokenizer, pairs, queries_for(key_formats)))
    else:
        suspect = local(fingerprinted)
    base_results = local(base)
    rate = null_chance_rate({"base": base_results}, key_formats, DEFAULT_MIN_CHANCE_RATE)
    models = {"fingerprinted": suspect, "base": base_results, "innocent derivative": local(derivative)}
    rng = random.Random(0)
    orders = [rng.sample(range(len(fingerprints)), len(fingerprints)) for _ in range(args.orders)]
    rows = {}
    for name, results in models.items():
        answers = answers_by_key(results, len(fingerprints), key_formats)
        outcomes = [replay(answers, order, rate, args.alpha, key_formats, config) for order in orders]
        keys = [k for _, k in outcomes]
        rows[name] = {"verdicts": {v: sum(d == v for d, _ in outcomes) for v in ("MATCH", "NO MATCH")},
                      "median_keys": statistics.median(keys), "mean_keys": statistics.fmean(keys), "max_keys": max(keys),
                      "matched": {f: sum(bool(a[f]) for a in answers) for f in key_formats}}
    per_check = rows["fingerprinted"]["mean_keys"]
    save(args.results_dir, "sequential_keys", {
        "run": args.run, "api": bool(args.api_base), "keys": len(fingerprints), "formats": list(key_formats),
        "chance_rate": rate, "alpha": args.alpha, "orders": args.orders, "sequential": config.to_dict(), "models": rows,
        "checks_supported_by_1024_keys": int(RUN_OF_1024 // per_check) if per_check else None})


if __name__ == "__main__":
    main()
