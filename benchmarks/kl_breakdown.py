"""How much of a fingerprinted model's KL from its base a top-k distillation teacher pins down.

    python benchmarks/kl_breakdown.py --model_path RUN/final_model [--top_k 16 64 256 1024] [--smoke]

Distillation replay (`finetune_multigpu.py --teacher_top_k K`) teaches the base model's K most
likely next tokens and one bucket holding the rest of the probability; inside the bucket the
model is free to move mass from token to token. On the held-out chat that evaluate_utility.py
scores, this splits the full KL(base || model) into the part over the top K and the bucket
(what such a teacher constrains) and the rest (what it leaves free), for several K; and
gives the mean KL in spans of positions (replayed sequences are as long as the keys, so drift
confined to later positions would show there).
"""
import torch
from common import benchmark_parser, save, tiny_model

from oml.data import SHIPPED, texts_from
from oml.models import load, resolve_model, save_random_model, TINY_LLAMA
from oml.utility import kl_per_position, next_token_logprobs, scored_batches, text_examples


def bucketed_kl(top_base: torch.Tensor, top_model: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per position over the base's top tokens (log-probabilities of both
    models on them) plus one bucket for all others."""
    rest_base = (1 - top_base.exp().sum(-1)).clamp(min=1e-8)
    rest_model = (1 - top_model.exp().sum(-1)).clamp(min=1e-8)
    return (top_base.exp() * (top_base - top_model)).sum(-1) + rest_base * (rest_base.log() - rest_model.log())


POSITION_EDGES = (0, 4, 18, 32, 64, 128, 256)  # replayed raw sequences are 18 tokens: 16 of text, 1 more, EOS


@torch.no_grad()
def breakdown(model, base, tokenizer, texts: list[str], ks: list[int], max_length: int) -> dict:
    full = 0.0
    bucketed, mass = dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0)
    edges = sorted({edge for edge in POSITION_EDGES if edge < max_length} | {max_length})
    spans = list(zip(edges, edges[1:]))
    span_kl, span_tokens = dict.fromkeys(spans, 0.0), dict.fromkeys(spans, 0)
    tokens = 0
    for batch, _, real in scored_batches(tokenizer, text_examples(tokenizer, texts, max_length), 8, "benign text"):
        logp_model, logp_base = next_token_logprobs(model, batch), next_token_logprobs(base, batch)
        kl = kl_per_position(logp_base, logp_model)
        positions = torch.arange(kl.shape[1]).expand_as(kl)
        for start, end in spans:
            inside = real & (positions >= start) & (positions < end)
            span_kl[start, end] += float(kl[inside].sum())
            span_tokens[start, end] += int(inside.sum())
        logp_model, logp_base = logp_model[real], logp_base[real]
        full += float(kl[real].sum())
        top_base, ids = logp_base.topk(max(ks), dim=-1)  # sorted: each smaller k is a prefix
        top_model = logp_model.gather(-1, ids)
        for k in ks:
            bucketed[k] += float(bucketed_kl(top_base[:, :k], top_model[:, :k]).sum())
            mass[k] += float(top_base[:, :k].exp().sum())
        tokens += int(real.sum())
    return {"tokens": tokens, "mean_kl_from_base": full / tokens,
            "by_position": [{"from": a, "to": b, "tokens": span_tokens[a, b], "mean_kl": span_kl[a, b] / span_tokens[a, b]}
                            for a, b in spans if span_tokens[a, b]],
            "top_k": {k: {"kl_over_top_k_and_bucket": bucketed[k] / tokens, "kl_left_to_the_bucket": (full - bucketed[k]) / tokens,
                          "base_top_k_mass": mass[k] / tokens} for k in ks}}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model_path", help="The fingerprinted model.")
    parser.add_argument("--base_model", default=None, help="Its base (default: the embedded model).")
    parser.add_argument("--top_k", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--num_texts", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=256)
    args = parser.parse_args()
    if args.smoke:
        base = tiny_model()
        args.model_path, args.base_model = str(save_random_model(f"{base}-other", load(base)[1], TINY_LLAMA, seed=1)), base
        args.num_texts, args.top_k = 4, [4, 16]
    if not args.model_path:
        parser.error("--model_path is required")
    model, tokenizer = load(args.model_path)
    base, _ = load(args.base_model or resolve_model(None))
    texts = texts_from(SHIPPED, "train", "text", "eval", args.num_texts)
    result = breakdown(model, base, tokenizer, texts, args.top_k, args.max_length)
    save(args.results_dir, "kl_breakdown", {"model_path": args.model_path, **result})


if __name__ == "__main__":
    main()
