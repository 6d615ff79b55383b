"""How a suspect's server picks each token: greedy decoding, sampling, and the decoding-side attacks
that change the served token where a fingerprint's response is likely to be.

The checker (oml.checking) plays them inside its teacher-forced pass: `Decoding.serve` takes the
logits of every position and returns the token the server would serve there. Kept apart from the
checker because fingerprint generation also needs the attacks' notion of a word's spellings
(`neighbours`), to pick responses the neighbour attack cannot ban wholesale.
"""
import zlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessor

from oml import OMLError, distributed
from oml.replies import generate_ids


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
