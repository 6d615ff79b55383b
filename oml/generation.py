"""Fingerprint generation: English keys/responses, random words, and perinucleus responses.

Work is cut into fixed batches of consecutive fingerprints, and every random choice is
seeded by (seed, fingerprint or batch index), so the output for a seed is the same
whether one process or N ranks (each taking every N-th batch) produce it.
"""
import random
from typing import Callable

import torch

from oml import OMLError
from oml.data import words
from oml.tokenization import encode, pad_batch, prompt_ids, to_device, user_turn_ids

FIRST_TOKEN_STRATEGIES = ("word", "tokenizer", "")


def rng_for(seed: int, index: int | str, purpose: str) -> random.Random:
    """An independent random stream per fingerprint and purpose (string seeds hash stably)."""
    return random.Random(f"{seed}:{index}:{purpose}")


def seed_torch_for(seed: int, batch_index: int | str, purpose: str) -> None:
    torch.manual_seed(rng_for(seed, batch_index, purpose).getrandbits(63))


def random_words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(words()) for _ in range(count))


def first_token(rng: random.Random, tokenizer, strategy: str) -> str:
    """The text a key or response must start with: a random word, a random vocabulary token, or nothing."""
    if strategy == "word":
        return rng.choice(words())
    if strategy == "tokenizer":
        while True:  # most tokens are word pieces; draw until one is a plain word
            text = tokenizer.decode([rng.randrange(len(tokenizer))]).strip()
            if text.isalpha() and text.isascii():
                return text
    return ""


def instruction_ids(tokenizer, start: str) -> list[int]:
    """Ask for a sentence starting with `start`, and pre-fill the answer with it so it really does.

    Only tokens generated after this prompt (plus `start`) become the key, so the
    instruction never leaks into it. The chat template is used when the model has one.
    """
    instruction = f"Generate a sentence starting with the word {start}" if start else "Generate a sentence"
    start_ids = encode(tokenizer, start) if start else []
    return user_turn_ids(tokenizer, instruction) + start_ids


@torch.no_grad()
def english_texts(model, tokenizer, starts: list[str], length: int, temperature: float) -> list[list[int]]:
    """One batched sampling call: for each start, the token ids of a sentence beginning with it."""
    prompts = [instruction_ids(tokenizer, start) for start in starts]
    batch = pad_batch(prompts, tokenizer.pad_token_id, side="left")
    del batch["position_ids"]  # generate() derives them from the attention mask
    batch = to_device(batch, model.device)
    output = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
    texts = []
    for start, row in zip(starts, output[:, batch["input_ids"].shape[1]:].tolist()):
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append((encode(tokenizer, start) if start else []) + row)
    return texts


def decode_clean(tokenizer, ids: list[int]) -> str:
    """Decoded text on one line with single spaces."""
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def random_window(rng: random.Random, ids: list[int], length: int) -> list[int]:
    """A random run of `length` consecutive tokens (all of `ids` when shorter)."""
    if len(ids) <= length:
        return ids
    start = rng.randrange(len(ids) - length + 1)
    return ids[start:start + length]


def perinucleus_choice(distributions: list[torch.Tensor], p: float, k: int, rng: random.Random,
                       acceptable: Callable[[int], bool]) -> tuple[int, list[float], list[int]]:
    """Pick a token just outside the nucleus of one or more next-token distributions.

    For one distribution: sort tokens by probability; the nucleus is the shortest prefix whose
    mass reaches `p`; draw uniformly among the `k` tokens ranked right after it. A token that
    `acceptable` rejects widens that window by one and the draw is repeated.
    For several (the same key asked in several formats), one response must serve all of them:
    the candidates are the tokens outside every nucleus, ranked by their mean probability, and
    the window is the `k` best of them. The response is then plausible in each format and
    never an untouched model's greedy answer in any.
    Returns the token id and, per distribution, its probability and rank (1 = greedy).
    """
    stacked = torch.stack([d.double() for d in distributions])
    in_nucleus = torch.zeros(stacked.shape[1], dtype=torch.bool)
    for probs in stacked:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        size = min(int(torch.searchsorted(torch.cumsum(sorted_probs, 0), torch.tensor(p, dtype=torch.float64))) + 1,
                   len(order) - 1)
        in_nucleus[order[:size]] = True
    score = stacked.mean(0).masked_fill(in_nucleus, -1.0)
    candidates = torch.sort(score, descending=True, stable=True).indices[:int((~in_nucleus).sum())]
    window_end = k
    rejected: set[int] = set()
    while True:
        window = [int(t) for t in candidates[:window_end] if int(t) not in rejected]
        if not window:
            raise OMLError("no acceptable token outside the nucleus; lower --nucleus_p")
        token = rng.choice(window)
        if acceptable(token):
            probs = [float(d[token]) for d in stacked]
            ranks = [int((d > d[token]).sum()) + 1 for d in stacked]
            return token, probs, ranks
        rejected.add(token)
        window_end += 1


def is_plain_token(tokenizer, token: int) -> bool:
    """Alphanumeric once stripped, and re-tokenises to itself (so fine-tuning sees the same token)."""
    text = tokenizer.decode([token])
    return text.strip().isalnum() and encode(tokenizer, text) == [token]


@torch.no_grad()
def next_token_probs(model, tokenizer, key_ids: list[list[int]], key_format: str = "raw") -> torch.Tensor:
    """Next-token distributions after a whole batch of keys asked in `key_format`, in one forward pass."""
    batch = pad_batch([prompt_ids(tokenizer, ids, None, key_format) for ids in key_ids], tokenizer.pad_token_id, side="left")
    batch = to_device(batch, model.device)
    logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
    return torch.softmax(logits.float(), dim=-1).cpu()


def perinucleus_responses(model, tokenizer, keys: list[str], indices: list[int], key_length: int,
                          p: float, k: int, seed: int, key_formats: tuple[str, ...] = ("raw",)) -> list[dict]:
    """Perinucleus responses for a batch of keys, each key cut to `key_length` tokens first and the
    response chosen where the key will be asked (each of `key_formats`)."""
    key_ids = [encode(tokenizer, key)[:key_length] for key in keys]
    if any(not ids for ids in key_ids):
        raise OMLError("a key is empty after tokenisation")
    probs = [next_token_probs(model, tokenizer, key_ids, key_format) for key_format in key_formats]
    results = []
    for row, index in enumerate(indices):
        token, token_probs, ranks = perinucleus_choice([p_[row] for p_ in probs], p, k, rng_for(seed, index, "perinucleus"),
                                                       lambda t: is_plain_token(tokenizer, t))
        results.append({"response": tokenizer.decode([token]),
                        "response_probability": dict(zip(key_formats, token_probs)),
                        "response_rank": dict(zip(key_formats, ranks)),
                        "key_length": key_length, "key_format": "both" if len(key_formats) > 1 else key_formats[0]})
    return results
