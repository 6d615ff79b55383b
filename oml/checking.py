"""Checking fingerprints: does a model answer each key with its response under greedy decoding?

A batch of keys is checked with one teacher-forced forward pass over prompt + response.
Greedy decoding reproduces the response exactly when every response token is the argmax
given the tokens before it, so that pass decides every match and also yields the
response's probability and rank, the evidence owners want where greedy decoding misses.
Only misses with multi-token responses then need `generate()`, to show what the model
did say and to score the per-token (fractional) accuracy.
"""
import torch
from tqdm import tqdm

from oml import distributed
from oml.tokenization import pad_batch, prompt_ids, to_device

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


@torch.no_grad()
def check_batch(model, tokenizer, pairs: list[tuple[list[int], list[int]]], query: Query, decode_misses: bool = True,
                suppress_above: float | None = None) -> list[dict]:
    """Per-key results for a batch of (key ids, response ids), all asked the same way. With
    `decode_misses`, misses of multi-token responses are decoded greedily to report what the model said.

    `suppress_above` plays the output-suppression attack: wherever the top token's probability
    exceeds that gate, the server serves the second-ranked token instead; a key matches when
    the served tokens are the response."""
    prompts = [prompt_ids(tokenizer, key_ids, query[1], query[0]) for key_ids, _ in pairs]
    longest_response = max(len(response) for _, response in pairs)
    batch = pad_batch([p + r for p, (_, r) in zip(prompts, pairs)], tokenizer.pad_token_id, side="left")
    logits = model(**to_device(batch, model.device), logits_to_keep=longest_response + 1).logits
    probs = torch.softmax(logits.float(), dim=-1).cpu()

    results = []
    for row, (_, response) in enumerate(pairs):
        # Sequences end at the last column, so response token j is predicted at column -(len+1)+j.
        steps = probs[row, probs.shape[1] - len(response) - 1:probs.shape[1] - 1]
        target = torch.tensor(response)
        token_probs = steps[torch.arange(len(response)), target]
        top_probs, top_ids = steps[0].topk(TOP_K)
        best2_probs, best2 = steps.topk(2, dim=-1)
        served = best2[:, 0]
        if suppress_above is not None:
            served = torch.where(best2_probs[:, 0] > suppress_above, best2[:, 1], served)
        results.append({
            "match": bool((served == target).all()),
            "predicted_ids": served.tolist(),
            "response_probability": float(token_probs.prod()),
            "response_rank": int((steps[0] > token_probs[0]).sum()) + 1,
            "top_tokens": [[tokenizer.decode([t]), float(p)] for t, p in zip(top_ids.tolist(), top_probs.tolist())],
        })

    redo = [i for i, result in enumerate(results)
            if decode_misses and suppress_above is None and not result["match"] and len(pairs[i][1]) > 1]
    if redo:
        outputs = greedy_continuations(model, tokenizer, [prompts[i] for i in redo], longest_response)
        for i, output in zip(redo, outputs):
            results[i]["predicted_ids"] = output[:len(pairs[i][1])]
    for result, (_, response) in zip(results, pairs):
        predicted = result.pop("predicted_ids")
        result["predicted"] = tokenizer.decode(predicted)
        result["token_accuracy"] = 1.0 if result["match"] else sum(p == r for p, r in zip(predicted, response)) / len(response)
    return results


def check_model(model, tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query],
                batch_size: int, description: str = "checking", progress: bool = True, decode_misses: bool = True,
                suppress_above: float | None = None) -> list[dict]:
    """Every key asked every way in `queries`; ranks share the batches and all get the full list,
    ordered by query, then key. Every rank runs as many forward passes (repeating its last batch
    if it has fewer), since a ZeRO-3 model needs all ranks in every forward."""
    work = [(q, i) for q in range(len(queries)) for i in range(len(pairs))]
    batches = [work[start:start + batch_size] for start in range(0, len(work), batch_size)]
    per_rank = -(-len(batches) // distributed.world_size())
    mine = batches[distributed.rank()::distributed.world_size()]
    results = []
    was_training = model.training
    model.eval()
    for step in tqdm(range(per_rank), desc=description, disable=not (progress and distributed.is_main_process())):
        batch = mine[min(step, len(mine) - 1)] if mine else batches[0]
        by_query: dict[int, list[int]] = {}
        for q, i in batch:
            by_query.setdefault(q, []).append(i)
        for q, indices in by_query.items():
            checked = check_batch(model, tokenizer, [pairs[i] for i in indices], queries[q], decode_misses, suppress_above)
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
