"""The batched checker versus checking one key at a time with generate(), as the original does.

    python benchmarks/check_speed.py [--num_fingerprints 256] [--response_length 1] [--smoke]

Both check the same fingerprints on the embedded model; half of the responses are the
model's own greedy continuations, so matches and misses are both exercised. Each is also
given as model GFLOP/s (real tokens only) and as a fraction of this machine's matrix-product
peak, measured in the same run. `per_key_softmax` is the checker before this version (a full
softmax and the evidence computed key by key after each batched forward pass), timed beside it.
"""
import torch
from common import (benchmark_model, benchmark_parser, forward_gflop, measured_peak_gflops, one_generate_per_key, random_word_keys,
                    save, timed, utilisation)

from oml.checking import BARE, check_model
from oml.replies import generate_ids
from oml.models import load
from oml.tokenization import encode, pad_batch, prompt_ids, to_device


@torch.no_grad()
def per_key_softmax(model, tokenizer, pairs, batch_size: int) -> list[bool]:
    """The previous checker: one forward pass per batch, then per key a softmax over the whole
    vocabulary, top-10 tokens and the response's rank."""
    matches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = to_device(pad_batch([prompt_ids(tokenizer, k) + r for k, r in chunk], tokenizer.pad_token_id, side="left"), model.device)
        longest = max(len(r) for _, r in chunk)
        probs = torch.softmax(model(**batch, logits_to_keep=longest + 1).logits.float(), dim=-1)
        for row, (_, response) in enumerate(chunk):
            steps = probs[row, probs.shape[1] - len(response) - 1:probs.shape[1] - 1]
            target = torch.tensor(response, device=probs.device)
            token_probs = steps[torch.arange(len(response)), target]
            steps[0].topk(10)
            int((steps[0] > token_probs[0]).sum())
            matches.append(bool((steps.argmax(-1) == target).all()))
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
    own = generate_ids(model, tokenizer, [prompt_ids(tokenizer, k) for k in keys], args.response_length)
    pairs = [(k, o if i % 2 == 0 else encode(tokenizer, " zebra umbrella")[:args.response_length])
             for i, (k, o) in enumerate(zip(keys, own))]

    check_model(model, tokenizer, pairs[:args.batch_size], BARE, args.batch_size)  # warm-up
    peak = measured_peak_gflops()
    batched, batched_s = timed(check_model, model, tokenizer, pairs, BARE, args.batch_size)
    before, before_s = timed(per_key_softmax, model, tokenizer, pairs, args.batch_size)
    single, single_s = timed(one_generate_per_key, model, tokenizer, pairs, BARE)
    identical = sum(r.match == m == b for r, m, b in zip(batched, single, before))
    gflop = forward_gflop(model, sum(len(prompt_ids(tokenizer, k)) + len(r) for k, r in pairs))
    save(args.results_dir, f"check_speed_r{args.response_length}", {
        "num_fingerprints": len(pairs), "response_length": args.response_length, "batch_size": args.batch_size,
        "batched_s": batched_s, "per_key_softmax_s": before_s, "one_at_a_time_s": single_s, "speedup": single_s / batched_s,
        "identical_per_key_results": identical, "matches": sum(single), "model_gflop": gflop, "peak_gflop_per_s": peak,
        "batched": utilisation(gflop, batched_s, peak), "per_key_softmax": utilisation(gflop, before_s, peak),
        "one_at_a_time": utilisation(gflop, single_s, peak)})


if __name__ == "__main__":
    main()
