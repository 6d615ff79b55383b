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
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

import torch
from tqdm import tqdm
from transformers import LogitsProcessor

from oml import OMLError, distributed
from oml.models import load
from oml.prefix_sharing import last_logits
from oml.replies import generate_ids
from oml.tokenization import fingerprint_pairs, has_chat_template, prompt_ids, response_pairs

logger = logging.getLogger(__name__)

TOP_K = 10


class Query(NamedTuple):
    """How a key is asked, locally or over an API: as raw text or as a chat user message, bare or
    inside a system-prompt template (raw: around the key; chat: as the system message)."""
    key_format: str = "raw"
    template: str | None = None


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


def normalised(text: str) -> str:
    """A token's or word's text casefolded, with only its letters and digits: the form in which the
    neighbour and lookahead attacks compare words, so that ' Paris', 'paris' and 'PARIS.' are one."""
    return "".join(char for char in text.casefold() if char.isalnum())


@lru_cache(maxsize=4)
def normalised_vocabulary(tokenizer) -> tuple[str, ...]:
    """Every token's normalised text, special tokens' ''."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    return tuple("" if token in special else normalised(text) for token, text in enumerate(texts))


def normalised_token(tokenizer, token: int) -> str:
    """A token's normalised text: '' for special tokens, which the attacks never touch, and for ids
    beyond the tokenizer's vocabulary (rows a model pads its output layer with)."""
    vocabulary = normalised_vocabulary(tokenizer)
    return vocabulary[token] if token < len(vocabulary) else ""


@lru_cache(maxsize=65536)
def neighbours(tokenizer, token: int) -> tuple[int, ...]:
    """The tokens whose normalised text is a prefix of `token`'s or starts with it: its case, spacing
    and punctuation variants, and the pieces a model could spell it with (none for a token that
    normalises to nothing). Cached: a vocabulary scan per token."""
    text = normalised_token(tokenizer, token)
    if not text:
        return ()
    return tuple(i for i, other in enumerate(normalised_vocabulary(tokenizer))
                 if other and (other.startswith(text) or text.startswith(other)))


@dataclass(frozen=True)
class Decoding:
    """How the suspect's server picks each token: greedy decoding, or (the subclasses) sampling and
    the decoding-side attacks of "Are Robust LLM Fingerprints Adversarially Robust?" (arXiv
    2509.26598, with the default parameters of its mlprints reproduction), which change the served
    token where a fingerprint's response is likely to be. A key matches when the served tokens are
    its response. Frozen, so that results can be kept per decoding."""
    temperature = None  # sampling's: every other decoding is deterministic
    num_tokens = None  # attacks act on this many generated tokens (None: on every one)

    def window(self, first: torch.Tensor, length: int) -> torch.Tensor:
        """[rows, length] mask of the positions the decoding acts on: from each row's first generated
        position `first[row]`, `num_tokens` of them."""
        offset = torch.arange(length, device=first.device) - first[:, None]
        return (offset >= 0) & (offset < (self.num_tokens or length))

    def serve(self, model, tokenizer, prompts: list[list[int]], logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The served token at every position of [rows, positions, vocab] logits, teacher-forced: row
        i's logits follow `prompts[i]` and then, from position `first[i]` on, the tokens the server
        is taken to have served. Greedy: the likeliest token."""
        return logits.argmax(-1)


@dataclass(frozen=True)
class Sampling(Decoding):
    """Sampling at `temperature`, seeded by (seed, prompt), so that draws do not depend on how prompts are batched."""
    temperature: float = 1.0
    seed: int = 0

    def serve(self, model, tokenizer, prompts, logits, first):
        probs = torch.softmax(logits / self.temperature, dim=-1)
        seeds = [zlib.crc32(repr((self.seed, prompt)).encode()) for prompt in prompts]
        return torch.stack([torch.multinomial(p, 1, generator=torch.Generator(p.device).manual_seed(s)).squeeze(-1)
                            for p, s in zip(probs, seeds)])


@dataclass(frozen=True)
class TopKSuppression(Decoding):
    """Wherever the top token's probability exceeds `gate`, the `k` likeliest tokens are banned and
    the best remaining one is served. DetectTop-k: k 1, gate 0.9, on the first generated token;
    output suppression: the same on every token (`num_tokens` None)."""
    k: int = 1
    gate: float = 0.9
    num_tokens: int | None = 1

    def serve(self, model, tokenizer, prompts, logits, first):
        top_logits, top_ids = logits.topk(self.k + 1, dim=-1)
        confident = torch.exp(top_logits[..., 0] - torch.logsumexp(logits, dim=-1)) > self.gate
        return torch.where(confident & self.window(first, logits.shape[1]), top_ids[..., self.k], top_ids[..., 0])


@dataclass(frozen=True)
class NeighbourSuppression(Decoding):
    """SuppressNeighbor: at the first generated position the `candidate_set_size` likeliest tokens
    (those above `add_threshold`) are found, and all their `neighbours` are banned for the first
    `num_tokens` positions (at each, those above `generation_threshold`), so that no spelling of
    the likeliest word gets through. DetectNeighbor: both thresholds 0.9."""
    candidate_set_size: int = 1
    num_tokens: int | None = 1
    add_threshold: float = 0.0
    generation_threshold: float = 0.0

    def serve(self, model, tokenizer, prompts, logits, first):
        probs = torch.softmax(logits, dim=-1)
        start_probs, start_ids = probs[torch.arange(len(prompts), device=logits.device), first].topk(self.candidate_set_size, -1)
        banned = torch.zeros(len(prompts), logits.shape[-1], dtype=torch.bool, device=logits.device)
        for row, (row_probs, row_ids) in enumerate(zip(start_probs.tolist(), start_ids.tolist())):
            for token in [t for t, p in zip(row_ids, row_probs) if p > self.add_threshold]:
                banned[row, list(neighbours(tokenizer, token))] = True
        hit = banned[:, None, :] & self.window(first, logits.shape[1])[..., None] & (probs > self.generation_threshold)
        return logits.masked_fill(hit, -torch.inf).argmax(-1)


LOOKAHEAD_BRANCHES = 256  # lookahead branches per generate() call: bounds its memory whatever the batch


class TopTokenRecorder(LogitsProcessor):
    """Records, at every step of generate(), the `k` likeliest tokens and their probabilities, and
    which sequences are still going: none of their tokens from the prompt's last one on is special
    (generate() goes on past a sequence's end while others in the batch have not ended). The
    scores pass unchanged."""

    def __init__(self, k: int, stop_ids: list[int]):
        self.k, self.stop_ids, self.start, self.steps = k, torch.tensor(stop_ids), None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        alive = ~torch.isin(input_ids[:, self.start - 1:], self.stop_ids.to(input_ids.device)).any(-1)
        probs, ids = torch.softmax(scores.float(), dim=-1).topk(self.k, dim=-1)
        self.steps.append((alive.tolist(), ids.tolist(), probs.tolist()))
        return scores


@dataclass(frozen=True)
class LookaheadSuppression(Decoding):
    """SuppressLookahead: before answering, the server branches on the `beam_width` likeliest first
    tokens and greedily decodes `lookahead_tokens` from each; tokens among the `top_k` of some
    lookahead step with a probability above `candidate_threshold` (their highest), that are neither
    special, nor in the prompt, nor a word of it, are candidates, the most often seen (then
    likeliest) `candidate_set_size` of them lose `suppression_delta` logits for the first
    `num_tokens` generated positions. So a memorised continuation is pushed out while words the
    user wrote may still be said. As in the reproduction, the statistics start after the branching
    token; unlike it, a branch stops counting once it has ended."""
    beam_width: int = 10
    lookahead_tokens: int = 32  # the branching token included (at least 2)
    top_k: int = 10
    candidate_set_size: int = 12
    candidate_threshold: float = 0.4
    num_tokens: int | None = 16
    suppression_delta: float = 10.0

    def candidates(self, model, tokenizer, prompts: list[list[int]], seeds: list[list[int]]) -> list[list[int]]:
        """The tokens to suppress after each prompt, its lookahead branching on each of its `seeds`."""
        branches = [(row, prompt + [seed]) for row, (prompt, row_seeds) in enumerate(zip(prompts, seeds)) for seed in row_seeds]
        seen: list[dict[int, list]] = [{} for _ in prompts]  # token -> [times seen, highest probability]
        for start in range(0, len(branches), LOOKAHEAD_BRANCHES):
            chunk = branches[start:start + LOOKAHEAD_BRANCHES]
            recorder = TopTokenRecorder(self.top_k, tokenizer.all_special_ids)
            generate_ids(model, tokenizer, [ids for _, ids in chunk], self.lookahead_tokens - 1, logits_processors=[recorder])
            for alive, step_ids, step_probs in recorder.steps:
                for (row, _), live, ids, probs in zip(chunk, alive, step_ids, step_probs):
                    if not live:
                        continue
                    for token, p in zip(ids, probs):
                        stats = seen[row].setdefault(token, [0, 0.0])
                        stats[0], stats[1] = stats[0] + 1, max(stats[1], p)
        chosen = []
        for prompt, stats in zip(prompts, seen):
            words = {""} | {normalised(word) for word in tokenizer.decode(prompt, skip_special_tokens=True).split()}
            in_prompt = set(prompt)
            kept = sorted(((count, p, token) for token, (count, p) in stats.items() if p > self.candidate_threshold
                           and token not in in_prompt and normalised_token(tokenizer, token) not in words), reverse=True)
            chosen.append([token for _, _, token in kept[:self.candidate_set_size]])
        return chosen

    def serve(self, model, tokenizer, prompts, logits, first):
        if distributed.world_size() > 1:  # generate() stops when its batch ends: ranks would fall out of step
            raise OMLError("SuppressLookahead runs in one process")
        seeds = logits[torch.arange(len(prompts), device=logits.device), first].topk(self.beam_width, dim=-1).indices.tolist()
        penalty = torch.zeros(len(prompts), logits.shape[-1], device=logits.device)
        for row, tokens in enumerate(self.candidates(model, tokenizer, prompts, seeds)):
            penalty[row, tokens] = self.suppression_delta
        return (logits - penalty[:, None, :] * self.window(first, logits.shape[1])[..., None]).argmax(-1)


GREEDY = Decoding()


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
