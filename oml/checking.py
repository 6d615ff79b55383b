"""Checking fingerprints: does a model answer each key with its response under greedy decoding?

A batch of keys is checked with one teacher-forced forward pass over prompt + response.
Greedy decoding reproduces the response exactly when every response token is the argmax
given the tokens before it, so that pass decides every match and also yields the
response's probability and rank, the evidence owners want where greedy decoding misses.
Only misses with multi-token responses then need `generate()`, to show what the model
did say and to score the per-token (fractional) accuracy.
"""
import gc
import logging
import zlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from oml import OMLError, distributed
from oml.models import load
from oml.tokenization import fingerprint_pairs, has_chat_template, pad_batch, prompt_ids, to_device

logger = logging.getLogger(__name__)

TOP_K = 10


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[list[int]], length: int) -> list[list[int]]:
    """Greedy decoding of `length` tokens for a batch of prompts (left padding, one generate call)."""
    batch = pad_batch(prompts, tokenizer.pad_token_id, side="left")
    del batch["position_ids"]  # generate() derives them from the attention mask
    batch = to_device(batch, model.device)
    output = model.generate(**batch, do_sample=False, max_new_tokens=length,
                            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return output[:, batch["input_ids"].shape[1]:].tolist()


Query = tuple[str, str | None]  # how a key is asked: (key format, system-prompt template or None)
BARE: list[Query] = [("raw", None)]


@dataclass(frozen=True)
class Decoding:
    """How the suspect's server picks each token: greedy (the default); greedy under the
    output-suppression attack (wherever the top token's probability exceeds `suppress_above`,
    the second-ranked token is served instead); or sampling at `temperature`.
    A key matches when the served tokens are its response."""
    suppress_above: float | None = None
    temperature: float | None = None
    seed: int = 0

    def serve(self, logits: torch.Tensor, keys: list[list[int]]) -> torch.Tensor:
        """The served token at every position of [keys, positions, vocab] logits. Samples are seeded
        by (seed, key), so they do not depend on how keys are batched."""
        if self.temperature:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            seeds = [zlib.crc32(repr((self.seed, key)).encode()) for key in keys]
            return torch.stack([torch.multinomial(p, 1, generator=torch.Generator(p.device).manual_seed(s)).squeeze(-1)
                                for p, s in zip(probs, seeds)])
        best_logits, best = logits.topk(2, dim=-1)
        if self.suppress_above is None:
            return best[..., 0]
        top_probability = torch.exp(best_logits[..., 0] - torch.logsumexp(logits, dim=-1))
        return torch.where(top_probability > self.suppress_above, best[..., 1], best[..., 0])


GREEDY = Decoding()


@torch.no_grad()
def check_batch(model, tokenizer, pairs: list[tuple[list[int], list[int]]], query: Query, decode_misses: bool = True,
                decoding: Decoding = GREEDY) -> list[dict]:
    """Per-key results for a batch of (key ids, response ids), all asked the same way and decoded
    by `decoding` (teacher-forced: for a match every earlier served token is the response's, so one
    pass decides it exactly). The response probability is under `decoding`'s temperature: with
    sampling it is the expected match rate. Everything is computed from the logits of the kept
    positions, batched, with no full softmax. With `decode_misses`, greedy misses of multi-token
    responses are decoded with generate() to report what the model said."""
    prompts = [prompt_ids(tokenizer, key_ids, query[1], query[0]) for key_ids, _ in pairs]
    longest = max(len(response) for _, response in pairs)
    batch = pad_batch([p + r for p, (_, r) in zip(prompts, pairs)], tokenizer.pad_token_id, side="left")
    # Sequences end at the last column, so with responses right-aligned in `longest` slots,
    # slot j is predicted at column j of the kept logits (the last column predicts what follows).
    logits = model(**to_device(batch, model.device), logits_to_keep=longest + 1).logits[:, :-1].float()
    rows = torch.arange(len(pairs), device=logits.device)
    targets = torch.full((len(pairs), longest), -1, dtype=torch.long)
    for i, (_, response) in enumerate(pairs):
        targets[i, longest - len(response):] = torch.tensor(response)
    targets = targets.to(logits.device)
    real = targets >= 0
    scaled = logits / (decoding.temperature or 1.0)
    log_norm = torch.logsumexp(scaled, dim=-1)
    target_logprob = scaled.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - log_norm
    served = decoding.serve(logits, [key_ids for key_ids, _ in pairs])
    first = longest - torch.tensor([len(response) for _, response in pairs], device=logits.device)
    first_logits = scaled[rows, first]
    top_logits, top_ids = first_logits.topk(TOP_K, dim=-1)
    top_probs = torch.exp(top_logits - log_norm[rows, first].unsqueeze(-1))
    match = ((served == targets) | ~real).all(-1).tolist()
    probability = torch.exp((target_logprob * real).sum(-1)).tolist()
    rank = ((first_logits > scaled[rows, first, targets[rows, first]].unsqueeze(-1)).sum(-1) + 1).tolist()
    served, top_ids, top_probs = served.tolist(), top_ids.tolist(), top_probs.tolist()

    results = []
    for i, (_, response) in enumerate(pairs):
        results.append({
            "match": match[i],
            "predicted_ids": served[i][longest - len(response):],
            "response_probability": probability[i],
            "response_rank": rank[i],
            "top_tokens": [[token, p] for token, p in zip(tokenizer.batch_decode([[t] for t in top_ids[i]]), top_probs[i])],
        })
    redo = [i for i, result in enumerate(results)
            if decode_misses and decoding == GREEDY and not result["match"] and len(pairs[i][1]) > 1]
    if redo:
        outputs = greedy_continuations(model, tokenizer, [prompts[i] for i in redo], longest)
        for i, output in zip(redo, outputs):
            results[i]["predicted_ids"] = output[:len(pairs[i][1])]
    for result, (_, response) in zip(results, pairs):
        predicted = result.pop("predicted_ids")
        result["predicted"] = tokenizer.decode(predicted)
        result["token_accuracy"] = 1.0 if result["match"] else sum(p == r for p, r in zip(predicted, response)) / len(response)
    return results


def check_model(model, tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query],
                batch_size: int, description: str = "checking", progress: bool = True, decode_misses: bool = True,
                decoding: Decoding = GREEDY) -> list[dict]:
    """Every key asked every way in `queries`; ranks share the batches and all get the full list,
    ordered by query, then key. Every rank runs as many forward passes (repeating its last batch
    if it has fewer), since a ZeRO-3 model needs all ranks in every forward: so a batch never
    mixes two queries (it would take one forward pass per query, and ranks would differ)."""
    batches = [(q, range(start, min(start + batch_size, len(pairs))))
               for q in range(len(queries)) for start in range(0, len(pairs), batch_size)]
    per_rank = -(-len(batches) // distributed.world_size())
    mine = batches[distributed.rank()::distributed.world_size()]
    results = []
    was_training = model.training
    model.eval()
    for step in tqdm(range(per_rank), desc=description, disable=not (progress and distributed.is_main_process())):
        q, indices = mine[min(step, len(mine) - 1)] if mine else batches[0]
        checked = check_batch(model, tokenizer, [pairs[i] for i in indices], queries[q], decode_misses, decoding)
        if step < len(mine):
            results += [{"index": i, "format": queries[q][0], "template": queries[q][1], "query": q, **r}
                        for i, r in zip(indices, checked)]
    model.train(was_training)
    gathered = (r for part in distributed.gather(results) for r in part)
    return sorted(gathered, key=lambda r: (r["query"], r["index"]))


def accuracy(results: list[dict]) -> tuple[float, float]:
    """Exact-match and per-token accuracy, in percent."""
    n = max(len(results), 1)
    return 100.0 * sum(r["match"] for r in results) / n, 100.0 * sum(r["token_accuracy"] for r in results) / n


def check_named_model(name: str, args, fingerprints: list[dict], queries: list[Query], suspect: bool = False,
                      decoding: Decoding = GREEDY) -> list[dict]:
    """Load a model by name, ask every key every way, free the model again. Keys are cut as `args`
    say (max_key_length, max_response_length; batch_size, trust_remote_code too). A null model
    without a chat template is only asked in raw format; a suspect must support every format asked."""
    model, tokenizer = load(name, args.trust_remote_code)
    if not has_chat_template(tokenizer) and any(f == "chat" for f, _ in queries):
        if suspect:
            raise OMLError(f"{name} has no chat template: use --query_format raw")
        logger.warning("null model %s has no chat template; it is checked in raw format only", name)
        queries = [q for q in queries if q[0] == "raw"]
    pairs = fingerprint_pairs(tokenizer, fingerprints, args.max_key_length, args.max_response_length)
    results = check_model(model, tokenizer, pairs, queries, args.batch_size, description=f"checking {name}", decoding=decoding)
    del model
    gc.collect()
    return results
