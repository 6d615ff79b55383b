"""Perinucleus responses for 512 keys on the embedded model: batched versus one key at a time.

    python benchmarks/perinucleus_speed.py [--num_keys 512] [--batch_size 128] [--formats raw chat] [--smoke]

Also as model GFLOP/s (real tokens) and a fraction of the matrix-product peak measured in the same run.
"""
from common import (benchmark_model, benchmark_parser, forward_gflop, measured_peak_gflops, random_word_keys, save, timed,
                    utilisation)

from oml.generation import perinucleus_responses
from oml.models import load
from oml.tokenization import encode, prompt_ids


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--num_keys", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--formats", nargs="+", default=["raw", "chat"], choices=["raw", "chat"])
    args = parser.parse_args()
    if args.smoke:
        args.num_keys, args.batch_size = 8, 4
    model, tokenizer = load(benchmark_model(args.smoke))
    keys = random_word_keys(args.num_keys)

    def run(batch_size: int) -> list[dict]:
        out = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            out += perinucleus_responses(model, tokenizer, chunk, list(range(start, start + len(chunk))), 16, 0.8, 3, 42,
                                         tuple(args.formats))
        return out

    run(args.batch_size)  # warm-up
    peak = measured_peak_gflops()
    batched, batched_s = timed(run, args.batch_size)
    single, single_s = timed(run, 1)
    same = sum(a["response"] == b["response"] for a, b in zip(batched, single))
    tokens = sum(len(prompt_ids(tokenizer, encode(tokenizer, key)[:16], None, f)) for key in keys for f in args.formats)
    gflop = forward_gflop(model, tokens)
    save(args.results_dir, "perinucleus_speed", {
        "num_keys": len(keys), "formats": args.formats, "batch_size": args.batch_size, "batched_s": batched_s,
        "one_at_a_time_s": single_s, "speedup": single_s / batched_s, "identical_responses": same, "model_gflop": gflop,
        "peak_gflop_per_s": peak, "batched": utilisation(gflop, batched_s, peak), "one_at_a_time": utilisation(gflop, single_s, peak)})


if __name__ == "__main__":
    main()
