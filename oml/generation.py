"""Fingerprint generation: English keys/responses, random words, and perinucleus responses.

Work is cut into fixed batches of consecutive fingerprints, and every random choice is
seeded by (seed, fingerprint or batch index), so the output for a seed is the same
whether one process or N ranks (each taking every N-th batch) produce it.
"""
import logging
import math
import random
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from oml import OMLError, distributed
from oml.decoding import neighbours
from oml.data import words
from oml.fingerprints import DEFAULT_KEY_LENGTH, load_keys
from oml.models import load
from oml.replies import generate_ids
from oml.stealth import benign_prompts, log_perplexities
from oml.settings import OPEN_UNIT_INTERVAL, POSITIVE_FLOAT, POSITIVE_INT, Settings, setting
from oml.tokenization import FORMAT_CHOICES, default_format, encode, formats, pad_batch, prompt_ids, to_device, user_turn_ids

logger = logging.getLogger(__name__)

FIRST_TOKEN_STRATEGIES = ("word", "tokenizer", "")
KEY_STYLES = ("sentence", "user_message")
# How people open messages to an assistant: a user_message key starts with one of these (our own list).
USER_OPENERS = ("Can you", "Could you", "How do I", "How can I", "How does", "What is", "What are", "What does", "Why does",
                "Why is", "Is it", "Is there", "Do you", "I need", "I want", "Help me", "Tell me", "Please", "Explain",
                "Give me", "Write", "Which", "Where can I", "When should I", "Should I", "My", "I have", "What's the")
DEFAULT_NUM_FINGERPRINTS = 8192
MAX_FINGERPRINTS = 1 << 20  # a million keys is far beyond any model's capacity; more is a typo
MAX_REDRAWS = 100


@dataclass(frozen=True)
class GenerationConfig(Settings):
    """How fingerprints are made (generate_finetuning_data.py's flags; see docs/guide.md for the strategies)."""
    key_length: int = setting(DEFAULT_KEY_LENGTH, "Tokens per key (the same default as fine-tuning's --max_key_length).",
                              POSITIVE_INT)
    response_length: int | None = setting(
        None, "Tokens per response (default 32; inverse_nucleus responses are always 1 token).", POSITIVE_INT)
    num_fingerprints: int | None = setting(
        None, f"How many to make (default {DEFAULT_NUM_FINGERPRINTS}, or every key of --keys_path).", POSITIVE_INT)
    batch_size: int = setting(128, "Fingerprints per batched model call.", POSITIVE_INT)
    temperature: float = setting(0.5, "Sampling temperature for English text.", POSITIVE_FLOAT)
    first_token_strategy: str = setting(
        "word", "English text starts with a random word, a random vocabulary token, or nothing ('').",
        choices=FIRST_TOKEN_STRATEGIES)
    key_response_strategy: str = setting(
        "independent", "Responses written independently of the key, perinucleus (inverse_nucleus) one-token responses, or "
                       "instead of (key, response) pairs the secret of the domain watermark family (domain_watermark: a "
                       "key that watermarks replies to the --domain's prompts; see docs/guide.md).",
        choices=("independent", "inverse_nucleus", "domain_watermark"))
    model_used_for_key_generation: str | None = setting(
        None, "Instruct model that writes English keys/responses (default: the embedded SmolLM2-135M-Instruct).", kind=str)
    random_word_generation: bool = setting(False, "Keys and responses are random English words instead of model text.")
    key_style: str | None = setting(
        None, "English keys are a message a user would send an assistant, picked among --key_candidates so that their "
              "perplexity spreads like benign prompts' (user_message, the default: keys a perplexity filter cannot tell "
              "from real prompts), or a sentence the model writes from the first token (sentence). Random-word and given "
              "keys have no style.", choices=KEY_STYLES)
    key_candidates: int = setting(4, "user_message keys: drafts written per key, the one closest to its perplexity target "
                                     "kept.", POSITIVE_INT)
    keys_path: str | None = setting(None, "JSON list of your own keys; then only responses are generated.", kind=str)
    seed: int = setting(42, "Same seed and settings: byte-identical output, for any number of ranks.", kind=int)
    inverse_nucleus_model: str | None = setting(
        None, "Model whose next-token distribution picks perinucleus responses: the model you will fingerprint (default: "
              "--model_used_for_key_generation).", kind=str)
    nucleus_p: float = setting(0.8, "Probability mass of the nucleus.", OPEN_UNIT_INTERVAL)
    nucleus_k: int = setting(3, "Width of the window just outside the nucleus.", POSITIVE_INT)
    responses_per_key: int = setting(
        1, "Perinucleus responses per key, each a different word (none spells another), all trained and all accepted: "
           "a server that bans its likeliest answer's word (SuppressNeighbor) still serves another. The chance rate "
           "floor of a check grows with it (docs/guide.md, 'The verdict').", POSITIVE_INT)
    key_format: str | None = setting(
        None, "Where perinucleus keys will be asked: as raw text, as a user message in the model's chat template, or both "
              "(default: both when the model has a chat template, else raw).", choices=FORMAT_CHOICES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_response_strategy == "inverse_nucleus":
            if self.response_length not in (None, 1):
                raise OMLError("inverse_nucleus responses are exactly one token: use --response_length 1")
            object.__setattr__(self, "response_length", 1)
        elif self.response_length is None:
            object.__setattr__(self, "response_length", 32)
        if self.responses_per_key > 1 and self.key_response_strategy != "inverse_nucleus":
            raise OMLError("--responses_per_key above 1 needs --key_response_strategy inverse_nucleus")
        if self.random_word_generation or self.keys_path:
            if self.key_style is not None:
                raise OMLError(f"--key_style {self.key_style} makes English keys: not with --random_word_generation or "
                               "--keys_path")
        elif self.key_style is None:
            object.__setattr__(self, "key_style", "user_message")
        if self.num_fingerprints is not None and self.num_fingerprints > MAX_FINGERPRINTS:
            raise OMLError(f"--num_fingerprints {self.num_fingerprints} is more than {MAX_FINGERPRINTS} (far beyond what a "
                           "model can hold)")

    @property
    def needs_text_model(self) -> bool:
        return not self.random_word_generation and (self.keys_path is None or self.key_response_strategy == "independent")


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


def user_message_ids(tokenizer, topic: str, opener: str) -> list[int]:
    """Ask for a user's question or request about `topic`, the answer pre-filled with `opener`:
    people's messages start the way `USER_OPENERS` do, and a small model left to itself would
    rather write a story than a message."""
    return user_turn_ids(tokenizer, f"Write a question about {topic}.") + encode(tokenizer, opener)


def english_texts(model, tokenizer, starts: list[str], length: int, temperature: float,
                  prompts: list[list[int]] | None = None) -> list[list[int]]:
    """One batched sampling call: for each start, the token ids of a text beginning with it (by
    default a sentence; `prompts` ask for something else and must end with their start)."""
    prompts = prompts or [instruction_ids(tokenizer, start) for start in starts]
    texts = []
    for start, row in zip(starts, generate_ids(model, tokenizer, prompts, length, temperature)):
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
    the candidates are the tokens outside every nucleus, ranked by their mean log-probability
    (the geometric mean of their probabilities), and the window is the `k` best of them. The
    response is then plausible in each format and never an untouched model's greedy answer in
    any. (Ranked by the mean probability, a token likely in one format wins however unlikely it
    is in the other: a raw continuation such as ' The' ranked thousands at the start of a chat
    reply, and training it there taught the model to open ordinary replies with such tokens.)
    Returns the token id and, per distribution, its probability and rank (1 = greedy).
    """
    stacked = torch.stack([d.double() for d in distributions])
    in_nucleus = torch.zeros(stacked.shape[1], dtype=torch.bool)
    for probs in stacked:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        size = min(int(torch.searchsorted(torch.cumsum(sorted_probs, 0), torch.tensor(p, dtype=torch.float64))) + 1,
                   len(order) - 1)
        in_nucleus[order[:size]] = True
    score = stacked.clamp(min=torch.finfo(torch.float64).tiny).log().mean(0).masked_fill(in_nucleus, -math.inf)
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


def spells_another(tokenizer, token: int, chosen: list[int]) -> bool:
    """Whether `token`'s word and a chosen response's are one word to a filter that compares
    normalised text by prefix (SuppressNeighbor bans every such spelling of the likeliest word)."""
    return any(token in neighbours(tokenizer, other) for other in chosen)


def perinucleus_responses(model, tokenizer, keys: list[str], indices: list[int], key_length: int,
                          p: float, k: int, seed: int, key_formats: tuple[str, ...] = ("raw",), responses_per_key: int = 1) -> list[dict]:
    """Perinucleus responses for a batch of keys, each key cut to `key_length` tokens first and the
    response chosen where the key will be asked (each of `key_formats`); with `responses_per_key`
    above 1, that many, drawn in turn from the same window, none spelling another's word."""
    key_ids = [encode(tokenizer, key)[:key_length] for key in keys]
    if any(not ids for ids in key_ids):
        raise OMLError("a key is empty after tokenisation")
    probs = [next_token_probs(model, tokenizer, key_ids, key_format) for key_format in key_formats]
    results = []
    for row, index in enumerate(indices):
        rng, chosen = rng_for(seed, index, "perinucleus"), []
        for _ in range(responses_per_key):
            token, token_probs, ranks = perinucleus_choice(
                [p_[row] for p_ in probs], p, k, rng, lambda t: is_plain_token(tokenizer, t) and not spells_another(tokenizer, t, chosen))
            if not chosen:  # the first response's odds are recorded: the others are drawn from the same window
                odds = dict(zip(key_formats, token_probs)), dict(zip(key_formats, ranks))
            chosen.append(token)
        record = {"response": tokenizer.decode(chosen[:1]), "response_probability": odds[0], "response_rank": odds[1]}
        if len(chosen) > 1:
            record["other_responses"] = [tokenizer.decode([token]) for token in chosen[1:]]
        results.append({**record, "key_length": key_length, "key_format": "both" if len(key_formats) > 1 else key_formats[0]})
    return results


def english_batch(config: GenerationConfig, rngs, text_model, batch_seed: str, purpose: str, length: int) -> list[list[int]]:
    """Token ids of one English text per fingerprint, each starting from its first token."""
    model, tokenizer = text_model
    seed_torch_for(config.seed, batch_seed, purpose)
    starts = [first_token(rng, tokenizer, config.first_token_strategy) for rng in rngs]
    return english_texts(model, tokenizer, starts, length, config.temperature)


def user_message_keys(config: GenerationConfig, rngs, text_model, batch_seed: str, purpose: str) -> list[str]:
    """One user-message key per fingerprint: `key_candidates` drafts, each a question or request
    about a random word, and the draft whose log-perplexity (under the writing model) is nearest
    a target drawn from benign prompts' own scores, so that keys spread over the benign range
    instead of bunching where model-written text sits."""
    model, tokenizer = text_model
    seed_torch_for(config.seed, batch_seed, purpose)
    drafts_per_key = config.key_candidates
    openers = [[rng.choice(USER_OPENERS) for _ in range(drafts_per_key)] for rng in rngs]
    prompts = [user_message_ids(tokenizer, rng.choice(words()), opener) for rng, row in zip(rngs, openers) for opener in row]
    starts = [opener for row in openers for opener in row]
    drafts = [first_line(tokenizer, ids) for ids in english_texts(model, tokenizer, starts, config.key_length,
                                                                      config.temperature, prompts)]
    scores = log_perplexities(model, tokenizer, drafts, config.key_length, len(drafts), description="drafts")
    short = [len(encode(tokenizer, draft)) < config.key_length // 2 for draft in drafts]
    benign = benign_reference(text_model)
    keys = []
    for i, rng in enumerate(rngs):
        target = float(np.quantile(benign, rng.random()))
        mine = range(i * drafts_per_key, (i + 1) * drafts_per_key)
        # A short draft ("hi,") is what many users type: kept only when every draft is short.
        keys.append(drafts[min(mine, key=lambda j: (short[j], abs(scores[j] - target)))])
    return keys


def first_line(tokenizer, ids: list[int]) -> str:
    """A draft message as a user would type it: its first line, on one line, without wrapping quotes."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0]
    return " ".join(text.strip().strip('"').split()) or tokenizer.decode(ids[:1])


_BENIGN_REFERENCE: "weakref.WeakKeyDictionary[torch.nn.Module, np.ndarray]" = weakref.WeakKeyDictionary()


def benign_reference(text_model, count: int = 100) -> np.ndarray:
    """Log-perplexities of `count` benign prompts of each shipped kind under the writing model
    (computed once per model): the distribution user-message keys are matched to. They come from
    the 'train' side of the shipped data, so that evaluate_stealth.py ('eval') never scores them."""
    model, tokenizer = text_model
    if model not in _BENIGN_REFERENCE:
        prompts = [text for texts in benign_prompts(count, split="train").values() for text in texts]
        _BENIGN_REFERENCE[model] = log_perplexities(model, tokenizer, prompts, description="benign prompts")
    return _BENIGN_REFERENCE[model]


def make_batch(config: GenerationConfig, indices: list[int], batch_seed: str, given_keys: list[str] | None, text_model,
               response_model, attempt: int = 0) -> list[dict]:
    """Fingerprints `indices` (one batch): keys first, then responses. Every random draw is seeded
    by the fingerprint or batch and the `attempt` (> 0 when a duplicate key is drawn again)."""
    retry = f":{attempt}" if attempt else ""
    rngs = [rng_for(config.seed, i, "words" + retry) for i in indices]
    if given_keys is not None:
        keys = [given_keys[i] for i in indices]
    elif config.random_word_generation:
        keys = [random_words(rng, config.key_length) for rng in rngs]
    elif config.key_style == "user_message":
        keys = user_message_keys(config, rngs, text_model, batch_seed, "keys" + retry)
    else:
        texts = english_batch(config, rngs, text_model, batch_seed, "keys" + retry, config.key_length)
        keys = [decode_clean(text_model[1], ids) for ids in texts]

    if config.key_response_strategy == "inverse_nucleus":
        model, tokenizer = response_model
        extras = perinucleus_responses(model, tokenizer, keys, indices, config.key_length, config.nucleus_p, config.nucleus_k,
                                       config.seed, formats(config.key_format or default_format(tokenizer)), config.responses_per_key)
        return [{"key": key, **extra} for key, extra in zip(keys, extras)]
    if config.random_word_generation:
        responses = [random_words(rng, config.response_length) for rng in rngs]
    else:
        texts = english_batch(config, rngs, text_model, batch_seed, "responses" + retry, 2 * config.response_length)
        responses = [decode_clean(text_model[1], random_window(rng, ids, config.response_length)) for rng, ids in zip(rngs, texts)]
    return [{"key": key, "response": response} for key, response in zip(keys, responses)]


def repeated_keys(fingerprints: list[dict], tokenizer, key_length: int) -> list[int]:
    """Indices of keys that repeat an earlier one, as text or, with a tokenizer, as the tokens
    fine-tuning will keep (a repeated key would count twice as evidence)."""
    seen, repeats = set(), []
    for i, record in enumerate(fingerprints):
        identity = tuple(encode(tokenizer, record["key"])[:key_length]) if tokenizer else record["key"]
        if identity in seen:
            repeats.append(i)
        seen.add(identity)
    return repeats


def draw_unique(config: GenerationConfig, fingerprints: list[dict], given_keys, text_model, response_model) -> list[dict]:
    """Draw repeated keys again until every key is unique (deterministically, on rank 0)."""
    tokenizer = (text_model or response_model or (None, None))[1]
    for attempt in range(1, MAX_REDRAWS + 1):
        repeats = repeated_keys(fingerprints, tokenizer, config.key_length)
        if not repeats:
            return fingerprints
        if given_keys is not None:
            raise OMLError(f"{config.keys_path} holds the same key more than once (e.g. {fingerprints[repeats[0]]['key']!r})")
        logger.info("Drawing %d repeated keys again", len(repeats))
        for start in range(0, len(repeats), config.batch_size):
            chunk = repeats[start:start + config.batch_size]
            redrawn = make_batch(config, chunk, f"redraw{attempt}:{start}", given_keys, text_model, response_model, attempt)
            for i, record in zip(chunk, redrawn):
                fingerprints[i] = record
    raise OMLError(f"keys still repeat after {MAX_REDRAWS} draws; use longer keys (--key_length)")


def generate_fingerprints(config: GenerationConfig, trust_remote_code: bool = False) -> list[dict] | None:
    """Make `config.num_fingerprints` fingerprints, each key unique. Under a distributed launcher each
    rank makes every N-th batch; rank 0 gets them all (other ranks get None)."""
    given_keys = load_keys(config.keys_path) if config.keys_path else None
    num = config.num_fingerprints or (len(given_keys) if given_keys else DEFAULT_NUM_FINGERPRINTS)
    if given_keys is not None and num > len(given_keys):
        raise OMLError(f"--num_fingerprints {num} is more than the {len(given_keys)} keys in {config.keys_path}")
    words()  # fail early if the word list is missing
    distributed.init()

    text_model = load(config.model_used_for_key_generation, trust_remote_code) if config.needs_text_model else None
    response_model = None
    if config.key_response_strategy == "inverse_nucleus":
        same = config.inverse_nucleus_model in (None, config.model_used_for_key_generation)
        response_model = text_model if same and text_model else load(
            config.inverse_nucleus_model or config.model_used_for_key_generation, trust_remote_code)

    num_batches = -(-num // config.batch_size)
    records = []
    for b in tqdm(range(distributed.rank(), num_batches, distributed.world_size()), desc="fingerprint batches",
                  disable=not distributed.is_main_process()):
        indices = list(range(b * config.batch_size, min((b + 1) * config.batch_size, num)))
        records.append((b, make_batch(config, indices, str(b), given_keys, text_model, response_model)))

    gathered = sorted(item for part in distributed.gather(records) for item in part)
    if not distributed.is_main_process():
        return None
    return draw_unique(config, [record for _, batch in gathered for record in batch], given_keys, text_model, response_model)
