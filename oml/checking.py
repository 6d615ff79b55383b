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
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from tqdm import tqdm

from oml import OMLError, distributed
from oml.decoding import GREEDY, Decoding
from oml.models import load
from oml.prefix_sharing import last_logits
from oml.replies import generate_ids
from oml.tokenization import fingerprint_pairs, has_chat_template, prompt_ids, response_pairs, system_message

logger = logging.getLogger(__name__)

TOP_K = 10


class Query(NamedTuple):
    """How a key is asked, locally or over an API: as raw text or as a chat user message, bare or
    inside a system-prompt template (raw: around the key; chat: as the system message)."""
    key_format: str = "raw"
    template: str | None = None

    def request_text(self, key: str) -> dict:
        """What asking `key` this way sends, as text: the completion prompt (raw), or the messages (chat)
        with the template's text as the system message. A server is sent it; a local check records it."""
        if self.key_format == "raw":
            return {"prompt": self.template.replace("{}", key) if self.template else key}
        system = [{"role": "system", "content": system_message(self.template)}] if self.template else []
        return {"messages": system + [{"role": "user", "content": key}]}


BARE: list[Query] = [Query()]


@dataclass
class KeyResult:
    """One key asked one way, and what the suspect answered: the per-key result of every check,
    local or over an API, that the statistics, reports and evaluations read."""
    index: int  # the fingerprint's position among those checked
    format: str  # the query's key format
    template: str | None  # the query's system-prompt template (None: the bare key)
    query: int  # the query's position among those asked
    match: bool | None  # None: no answer (a failed API request), never counted
    predicted: str = ""  # what the suspect said, as text
    response_probability: float | None = None  # of the whole response (API: its first token), when known
    response_rank: int | None = None  # of the response's first token among the suspect's next tokens, when known
    token_accuracy: float = 0.0  # share of the response's tokens predicted
    top_tokens: list = field(default_factory=list)  # [token, probability] of the 10 likeliest first tokens
    error: str | None = None  # why an API request got no answer
    request: dict | None = None  # API only: the body the server was sent (evidence; no API key in it)
    predicted_cut: bool = False  # API only: `predicted` is the start of a longer reply (a server may ignore max_tokens)
    refused: bool = False  # API only: the suspect refused to answer (chat's `refusal` field): a non-match, counted apart
    served_model: str | None = None  # API only: the model name the server said answered

    def to_dict(self) -> dict:
        return asdict(self)


def queries_for(key_formats: tuple[str, ...], templates: list[str | None] = (None,)) -> list[Query]:
    """Every key format with every template (None: the bare key), formats first."""
    return [Query(key_format, template) for key_format in key_formats for template in templates]


@torch.no_grad()
def check_batch(model, tokenizer, pairs: list[tuple[list[int], list[int]]], query: Query, decode_misses: bool = True,
                decoding: Decoding = GREEDY) -> list[dict]:
    """Per-key answers (the fields of a `KeyResult` that the model decides) for a batch of (key ids, response ids), all asked the same way and decoded
    by `decoding` (teacher-forced: for a match every earlier served token is the response's, so one
    pass decides it exactly). The response probability is under `decoding`'s temperature: with
    sampling it is the expected match rate. Everything is computed from the logits of the kept
    positions, batched, with no full softmax. With `decode_misses`, greedy misses of multi-token
    responses are decoded with generate() to report what the model said."""
    prompts = [prompt_ids(tokenizer, key_ids, query.template, query.key_format) for key_ids, _ in pairs]
    longest = max(len(response) for _, response in pairs)
    # Sequences end at the last column, so with responses right-aligned in `longest` slots,
    # slot j is predicted at column j of the kept logits (the last column predicts what follows).
    logits = last_logits(model, prompts, [r for _, r in pairs], tokenizer.pad_token_id, longest + 1)[:, :-1].float()
    rows = torch.arange(len(pairs), device=logits.device)
    targets = torch.full((len(pairs), longest), -1, dtype=torch.long)
    for i, (_, response) in enumerate(pairs):
        targets[i, longest - len(response):] = torch.tensor(response)
    targets = targets.to(logits.device)
    real = targets >= 0
    scaled = logits / (decoding.temperature or 1.0)
    log_norm = torch.logsumexp(scaled, dim=-1)
    target_logprob = scaled.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - log_norm
    first = longest - torch.tensor([len(response) for _, response in pairs], device=logits.device)
    served = decoding.serve(model, tokenizer, prompts, logits, first)
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
        outputs = generate_ids(model, tokenizer, [prompts[i] for i in redo], longest)
        for i, output in zip(redo, outputs):
            results[i]["predicted_ids"] = output[:len(pairs[i][1])]
    for result, (_, response) in zip(results, pairs):
        predicted = result.pop("predicted_ids")
        result["predicted"] = tokenizer.decode(predicted)
        result["token_accuracy"] = 1.0 if result["match"] else sum(p == r for p, r in zip(predicted, response)) / len(response)
    return results


def merged(results: list[KeyResult], owners: list[int]) -> list[KeyResult]:
    """One result per key and query from those of its accepted responses (`response_pairs`' order):
    the key matches when any response was served, and the first served (else the key's response)
    speaks for it. A deterministic server serves one reply per prompt, so at most one response matches."""
    per_key: dict[tuple[int, int], KeyResult] = {}
    for result in results:
        slot = (result.query, owners[result.index])
        if slot not in per_key or (result.match and not per_key[slot].match):
            per_key[slot] = replace(result, index=owners[result.index])
    return sorted(per_key.values(), key=lambda r: (r.query, r.index))


def check_model(model, tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query],
                batch_size: int, description: str = "checking", progress: bool = True, decode_misses: bool = True,
                decoding: Decoding = GREEDY, per_response: bool = False) -> list[KeyResult]:
    """Every key asked every way in `queries`; ranks share the batches and all get the full list,
    ordered by query, then key. Every rank runs as many forward passes (repeating its last batch
    if it has fewer), since a ZeRO-3 model needs all ranks in every forward: so a batch never
    mixes two queries (it would take one forward pass per query, and ranks would differ).
    A key with several accepted responses is checked for each, teacher-forced, and matches when
    any of them is what the decoding serves (one result per key, or with `per_response` one per
    response, indexed as in `response_pairs`)."""
    queries = [Query(*q) for q in queries]  # (format, template) pairs are accepted too
    pairs, owners = response_pairs(pairs)
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
            results += [KeyResult(index=i, format=queries[q].key_format, template=queries[q].template, query=q, **r)
                        for i, r in zip(indices, checked)]
    model.train(was_training)
    gathered = sorted((r for part in distributed.gather(results) for r in part), key=lambda r: (r.query, r.index))
    return gathered if per_response or len(owners) == len(set(owners)) else merged(gathered, owners)


def accuracy(results: list[KeyResult]) -> tuple[float, float]:
    """Exact-match and per-token accuracy, in percent."""
    n = max(len(results), 1)
    return 100.0 * sum(bool(r.match) for r in results) / n, 100.0 * sum(r.token_accuracy for r in results) / n


def check_named_model(name: str, fingerprints: list[dict], selection, queries: list[Query], batch_size: int = 64,
                      suspect: bool = False, decoding: Decoding = GREEDY, trust_remote_code: bool = False) -> list[KeyResult]:
    """Load a model by name, ask every key every way, free the model again. Keys are cut as the
    (resolved) `selection` says. A null model without a chat template is only asked in raw format;
    a suspect must support every format asked."""
    model, tokenizer = load(name, trust_remote_code)
    if not has_chat_template(tokenizer) and any(q.key_format == "chat" for q in queries):
        if suspect:
            raise OMLError(f"{name} has no chat template: use --query_format raw")
        logger.warning("null model %s has no chat template; it is checked in raw format only", name)
        queries = [q for q in queries if q.key_format == "raw"]
    pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
    results = check_model(model, tokenizer, pairs, queries, batch_size, description=f"checking {name}", decoding=decoding)
    del model
    gc.collect()
    return results
