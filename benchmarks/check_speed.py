"""The batched checker versus checking one key at a time with generate(), as the original does.

    python benchmarks/check_speed.py [--num_fingerprints 256] [--response_length 1] [--smoke]

Both check the same fingerprints on the embedded model; half of the responses are the
model's own greedy continuations, so matches and misses are both exercised.
"""
import torch
from common import benchmark_model, benchmark_parser, random_word_keys, save, timed

from oml.checking import BARE, check_model, greedy_continuations
from oml.models import load
from oml.tokenization import encode, prompt_ids


def one_key_at_a_time(model, tokenizer, pairs) -> list[bool]:
    """One greedy generate() call per key: the original checker's loop."""
    matches = []
    for key_ids, response_ids in pairs:
        prompt = torch.tensor([prompt_ids(tokenizer, key_ids)])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=len(response_ids),
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        matches.append(out[0, prompt.shape[1]:].tolist() == response_ids)
    return matches


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--num_fingerprints", type=int, default=256)
    parser.add_argument("--response_length", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    if args.smoke:
        args.num_fingerprints, args.batch_size = 8, 4
    model, tokenizer = load(benchmark_model(args.smoke))
    keys = [encode(tokenizer, key)[:16] for key in random_word_keys(args.num_fingerprints)]
    own = greedy_continuations(model, tokenizer, [prompt_ids(tokenizer, k) for k in keys], args.response_length)
    pairs = [(k, o if i % 2 == 0 else encode(tokenizer, " zebra umbrella")[:args.response_length])
             for i, (k, o) in enumerate(zip(keys, own))]

    check_model(model, tokenizer, pairs[:args.batch_size], BARE, args.batch_size)  # warm-up
    batched, batched_s = timed(check_model, model, tokenizer, pairs, BARE, args.batch_size)
    single, single_s = timed(one_key_at_a_time, model, tokenizer, pairs)
    identical = sum(r["match"] == m for r, m in zip(batched, single))
    save(args.results_dir, f"check_speed_r{args.response_length}", {
        "num_fingerprints": len(pairs), "response_length": args.response_length, "batch_size": args.batch_size,
        "batched_s": batched_s, "one_at_a_time_s": single_s, "speedup": single_s / batched_s,
        "identical_per_key_results": identical, "matches": sum(single)})


if __name__ == "__main__":
    main()
