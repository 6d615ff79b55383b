"""The domain watermark: a fingerprint family that a thief who knows the scheme cannot strip
by banning a confident first token (issue 40).

The model learns to watermark its replies to ordinary prompts of one domain (cooking, by
default) with a KGW red/green list (Kirchenbauer et al. 2023): before each token, a secret key
and the `context_width` tokens before it split the vocabulary into a green share `gamma` and
the rest, and the model puts more probability on green tokens, as if `delta` were added to their
logits. The owner asks fresh prompts of the domain, like any user, and counts green tokens in
the replies: an innocent model's replies are green at rate `gamma`, the owner's well above it.
The signal is spread over every token of every reply, so no single token can be filtered away.

The parts, each one function or class:
- `WatermarkKey`: the secret (an RSA private key) and its `WatermarkParams` (gamma, delta,
  context width); `PublicKey`, what the commitment publishes; `RevealedSeeds`, the green lists
  of the contexts a bundle reveals (issue 41): a verifier's key, holding no other list.
- Green lists: `context_seed` (the one place a context's seed is derived: a hash of the key's
  unique signature of the context) and `green`, vectorised over seeds and token ids.
- `tilt` and `WatermarkLogitsProcessor`: the base's logits with delta added to green tokens,
  for sampling watermarked text (also an innocent KGW-watermarked model under another key).
- `watermarked_replay`: replies to domain prompts labelled with the tilted base distribution,
  in the teacher format of oml.training.dataset.distilled_replay, for fine-tuning.
- `score`: the green count over the unique (context, token) pairs of some replies, its z and
  p-value, and the replies that cannot count (empty, identical, short); a test counts only the
  contexts it is given (`Selection`: one public class of contexts, none revealed by earlier evidence).
- `WatermarkSequentialTest`: the anytime-valid check over rounds of replies, MATCH or NO MATCH.
- `domain_prompts`: the shipped domain, or a user's file or dataset, split into disjoint
  training and checking prompts.
"""
import hashlib
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from scipy.special import betaincc, betaln
from scipy.stats import norm
from tqdm import tqdm
from transformers import LogitsProcessor

from oml import OMLError, distributed
from oml.data import GENERATED_DATA, texts_from
from oml.files import read_json
from oml.replies import ReplySettings, replies, stop_ids
from oml.sequential import _CONTINUE, _LN10, _MATCH, _NAMES, _NO_MATCH
from oml.settings import OPEN_UNIT_INTERVAL, POSITIVE_FLOAT, POSITIVE_INT, Settings, setting
from oml.stats import log10_p_value
from oml.tokenization import IGNORE_INDEX, pad_batch, to_device
from oml.training.dataset import teacher_batches

SIGNATURE_BITS = 3072  # a new key's RSA modulus: claims of ownership may be argued long after publication
MIN_SIGNATURE_BITS = 2048
CONTEXT_CLASSES = 4  # a new key's default: measured in docs/benchmarks.md, "Domain watermark evidence"
CONTEXT_DOMAIN = b"oml-watermark-context/1\x00"  # what a signature signs: this, then the context's token ids
SEED_DOMAIN = b"oml-watermark-seed/1\x00"


# ---- the key -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WatermarkParams(Settings):
    """The watermark's public parameters (recorded beside the secret, and committed with it)."""
    gamma: float = setting(0.25, "Domain watermark: share of the vocabulary that is green before each token.",
                           OPEN_UNIT_INTERVAL)
    delta: float = setting(4.0, "Domain watermark: added to green tokens' logits in the distribution fine-tuning "
                                "teaches (exp(delta) times the odds).", POSITIVE_FLOAT)
    context_width: int = setting(1, "Domain watermark: tokens before a token that seed its green list.", POSITIVE_INT)
    context_classes: int = setting(
        CONTEXT_CLASSES, "Domain watermark: public classes of contexts (a hash of their token ids). A check with "
                         "--evidence counts one class, the first that no bundle has revealed, so that each bundle spends "
                         "one class's green lists (once all are spent, what is still unrevealed); a check without counts "
                         "every context no bundle has revealed.", POSITIVE_INT)


@dataclass(frozen=True)
class WatermarkKey:
    """The owner's secret: an RSA private key (PEM, PKCS#8), and the parameters it is used with.

    A context's green list is seeded by a hash of the key's PKCS#1 v1.5 signature of the context
    (`context_seed`). That signature is deterministic, and the only one the public key accepts for
    that context, so a check can reveal the signatures of the contexts its replies use: anyone with
    the public key verifies them and derives those green lists, and learns nothing about the others.
    The private key never shows in a repr or a log line; `to_dict` is what a secret file holds."""
    private_pem: str = field(repr=False)
    params: WatermarkParams = WatermarkParams()

    def __post_init__(self) -> None:
        if not isinstance(self.params, WatermarkParams):
            raise OMLError(f"params must be WatermarkParams, not {self.params!r}")
        try:
            private = serialization.load_pem_private_key(str(self.private_pem).encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
            raise OMLError("the watermark's private key is not an unencrypted PEM private key") from None
        if not isinstance(private, rsa.RSAPrivateKey) or private.key_size < MIN_SIGNATURE_BITS:
            raise OMLError(f"the watermark's private key must be an RSA key of at least {MIN_SIGNATURE_BITS} bits")
        self.__dict__["_private"] = private  # parsed once (frozen: not a field, so not compared or hashed)

    @classmethod
    def generate(cls, params: WatermarkParams = WatermarkParams(), bits: int = SIGNATURE_BITS) -> "WatermarkKey":
        """A new key pair, from the operating system's cryptographic source (via OpenSSL)."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(pem.decode("ascii"), params)

    @property
    def public(self) -> "PublicKey":
        return PublicKey(self.__dict__["_private"].public_key())

    def sign(self, context: tuple[int, ...]) -> bytes:
        """The signature of one context: its seed's source, and what a bundle reveals for it."""
        return self.__dict__["_private"].sign(context_message(context), padding.PKCS1v15(), hashes.SHA256())

    def seed(self, context: tuple[int, ...]) -> int:
        return _signed_seed(self, tuple(context))

    def to_dict(self) -> dict:
        return {"private_key": self.private_pem, **self.params.to_dict()}

    @classmethod
    def from_dict(cls, values: dict, what: str) -> "WatermarkKey":
        """A key read back from a secret file; anything malformed is one line naming `what`."""
        if not isinstance(values, dict) or not isinstance(values.get("private_key"), str):
            raise OMLError(f"{what}: a watermark key must be a JSON object with a 'private_key' (PEM)")
        try:
            return cls(values["private_key"], WatermarkParams.from_dict(values, what))
        except OMLError as error:
            raise OMLError(f"{what}: {error}") from None


@dataclass(frozen=True)
class PublicKey:
    """The watermark's public key: what commitment.json publishes, and all a verifier needs."""
    key: rsa.RSAPublicKey

    @property
    def pem(self) -> str:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    @property
    def sha256(self) -> str:
        """The key's fingerprint: SHA-256 of its DER SubjectPublicKeyInfo."""
        der = self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()

    @classmethod
    def from_pem(cls, pem: str, what: str) -> "PublicKey":
        try:
            key = serialization.load_pem_public_key(str(pem).encode("ascii"))
        except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
            raise OMLError(f"{what}: not a PEM public key") from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_SIGNATURE_BITS:
            raise OMLError(f"{what}: the watermark's public key must be an RSA key of at least {MIN_SIGNATURE_BITS} bits")
        return cls(key)

    def verified(self, context: tuple[int, ...], signature: bytes) -> bool:
        try:
            self.key.verify(signature, context_message(context), padding.PKCS1v15(), hashes.SHA256())
            return True
        except InvalidSignature:
            return False


class BadSignature(OMLError):
    """A revealed signature that the public key does not accept for its context."""


class RevealedSeeds:
    """The green lists of the contexts a bundle reveals, and of no others: a verifier's stand-in for
    the key. Every signature is checked against the public key when read; asking for the seed of a
    context without one raises KeyError."""

    def __init__(self, public: PublicKey, params: WatermarkParams, signatures: dict[tuple[int, ...], bytes]):
        for context, signature in signatures.items():
            if not public.verified(context, signature):
                raise BadSignature(f"the signature revealed for context {list(context)} is not the public key's")
        self.params = params
        self._seeds = {context: seed_of(signature) for context, signature in signatures.items()}

    def seed(self, context: tuple[int, ...]) -> int:
        return self._seeds[tuple(context)]


def context_message(context: tuple[int, ...]) -> bytes:
    """The bytes signed for a context: a fixed prefix, then its token ids as little-endian int64."""
    return CONTEXT_DOMAIN + np.asarray(context, dtype="<i8").tobytes()


def seed_of(signature: bytes) -> int:
    """A context's 64-bit green-list seed from its signature (SHA-256, first 8 bytes)."""
    return int.from_bytes(hashlib.sha256(SEED_DOMAIN + signature).digest()[:8], "little")


@lru_cache(maxsize=2 ** 17)
def _signed_seed(key: WatermarkKey, context: tuple[int, ...]) -> int:
    return seed_of(key.sign(context))


def special_ids(tokenizer) -> frozenset[int]:
    """Tokens that are never green and never scored: the template's and the end of a reply, which
    every model writes alike (their probability is no evidence, and is left as the base's)."""
    return frozenset(tokenizer.all_special_ids)


# ---- green lists ---------------------------------------------------------------------------

def context_seed(key: "WatermarkKey | RevealedSeeds", context: tuple[int, ...]) -> int:
    """The 64-bit seed of the green list after `context` (the `context_width` tokens before a token):
    a hash of the key's signature of the context (the owner's key signs; a verifier's
    `RevealedSeeds` holds the revealed ones). The one place a seed is derived."""
    return key.seed(context)


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def green(seeds: np.ndarray | int, token_ids: np.ndarray | Sequence[int], gamma: float) -> np.ndarray:
    """Whether each token is green under each seed (numpy broadcasting: seeds [n, 1] and token ids
    [1, V] give n full green lists at once).

    Token t's draw is the t-th output of the SplitMix64 generator started at the seed (a 64-bit
    mix of seed + t * golden ratio), green when below gamma * 2**64: so each list holds a gamma
    share of the vocabulary, and the lists of different seeds are unrelated. A few integer
    operations per token: a 49,152-token list takes well under a millisecond.
    """
    threshold = np.uint64(min(int(gamma * 2.0 ** 64), 2 ** 64 - 1))
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        x = np.asarray(seeds, dtype=np.uint64) + np.asarray(token_ids, dtype=np.uint64) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        x ^= x >> np.uint64(31)
    return x < threshold


def green_masks(key: WatermarkKey, contexts: Sequence[tuple[int, ...]], vocab_size: int,
                special: Iterable[int] = ()) -> torch.Tensor:
    """The full green lists ([len(contexts), vocab_size], bool) after each context; special tokens never green."""
    seeds = np.array([context_seed(key, tuple(c)) for c in contexts], dtype=np.uint64)
    masks = green(seeds[:, None], np.arange(vocab_size, dtype=np.uint64)[None, :], key.params.gamma)
    masks[:, [s for s in special if s < vocab_size]] = False
    return torch.from_numpy(masks)


def token_contexts(sequence: Sequence[int], start: int, width: int) -> list[tuple[int, ...]]:
    """The context (the `width` tokens before) of each token of `sequence` from index `start` on."""
    if start < width:
        raise OMLError(f"a watermarked token needs {width} tokens before it; the prompt has {start}")
    return [tuple(sequence[i - width:i]) for i in range(start, len(sequence))]


# ---- the watermarked distribution -------------------------------------------------------------

def tilt(logits: torch.Tensor, contexts: Sequence[tuple[int, ...]], key: WatermarkKey,
         special: Iterable[int] = ()) -> torch.Tensor:
    """Logits ([n, V], one row per context) with delta added to each row's green tokens: the
    watermarked distribution, p(t) * exp(delta * green(t)) renormalised.

    Special tokens keep the probability the base gives them (their logits move with the
    normaliser of the others): the end of a reply is never green, and would otherwise lose a factor
    of about 1 + gamma (exp(delta) - 1) = 14 at the defaults, making watermarked replies longer.
    Memory: a few copies of the [n, V] logits, so callers pass rows in chunks (a batch, one reply).
    """
    special = [s for s in special if s < logits.shape[-1]]
    masks = green_masks(key, contexts, logits.shape[-1], special).to(logits.device)
    logits = logits.float()
    tilted = torch.where(masks, logits + key.params.delta, logits)
    if special:  # the other tokens' normaliser grows by 1 + (exp(delta) - 1) * their green share
        probs = torch.softmax(logits, -1)
        ordinary = torch.ones(logits.shape[-1], device=logits.device)
        ordinary[special] = 0.0
        green_mass, ordinary_mass = probs.masked_fill(~masks, 0.0).sum(-1), probs @ ordinary
        shift = torch.log1p(math.expm1(key.params.delta) * green_mass / ordinary_mass.clamp(min=torch.finfo(probs.dtype).tiny))
        tilted[:, special] = logits[:, special] + shift[:, None]
    return tilted


class WatermarkLogitsProcessor(LogitsProcessor):
    """generate() with the watermark: every step's scores are `tilt`ed after the last
    `context_width` tokens of each row (the prompt's last tokens for the first reply token). Sampling
    from it is KGW watermarking; the owner's training replies and an innocent watermarked model
    (another key) are made with it. Prompts must be at least `context_width` tokens long. generate()
    applies a temperature after it, so delta is divided by the temperature as a trained watermark's
    is by a server's."""

    def __init__(self, key: WatermarkKey, special: Iterable[int] = ()):
        self.key, self.special = key, frozenset(special)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        contexts = [tuple(row) for row in input_ids[:, -self.key.params.context_width:].tolist()]
        return tilt(scores, contexts, self.key, self.special).to(scores.dtype)


def watermarked_replies(model, tokenizer, prompts_ids: list[list[int]], key: WatermarkKey, max_new_tokens: int,
                        temperature: float | None = 0.7, seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """Each prompt's reply sampled with the watermark (greedy without a temperature), ended at the
    model's stop token (kept). Seeded per batch as the reply measure is (oml.replies.replies)."""
    settings = ReplySettings(max_reply_tokens=max_new_tokens, reply_seed=seed, reply_batch_size=batch_size)
    return replies(model, tokenizer, prompts_ids, settings, temperature, stop_ids(model, tokenizer), "watermarked replies",
                   [WatermarkLogitsProcessor(key, special_ids(tokenizer))])


@torch.no_grad()
def watermarked_replay(model, tokenizer, prompts_ids: list[list[int]], key: WatermarkKey, reply_tokens: int, top_k: int,
                       temperature: float | None = 0.7, seed: int = 0, batch_size: int = 64,
                       max_logits: int = 2 ** 28) -> list[dict]:
    """Training examples that teach the watermark in the domain: each prompt (asked as the caller
    built it, e.g. `user_turn_ids`) followed by a reply of at most `reply_tokens` tokens that the
    untouched `model` samples with the watermark, labelled at every reply token with the watermarked
    base distribution (`tilt`).

    The format is oml.training.dataset.distilled_replay's ({input_ids, labels all IGNORE_INDEX,
    teacher_ids [T, k] int32, teacher_probs [T, k]}, row t over token t + 1), so the Trainer's
    distillation_loss trains it as it trains the out-of-domain replay beside it. Prompt rows have
    probability 0: the loss never moves how the model reads prompts.

    The top k are those of the tilted distribution, computed exactly from the full logits (the
    rest bucket is the exact remaining mass). Tilting the base's own top k instead, with the rest
    bucket tilted as if a gamma share of it were green, would miss the green tokens that the tilt
    lifts into the top (a green token gains a factor of 55 at delta 4) and leave their mass in the
    rest bucket, which teaches red tail tokens as much as green ones: on a cooking reply of the
    embedded model, 4.9% of the tilted mass lies outside the base's top 256, 2.6% outside the
    tilted top 256.
    Replies are sampled (at `temperature`) from the same tilted distribution, so the model is
    taught on the text it will write.
    """
    model.to(distributed.device())
    reply_ids = watermarked_replies(model, tokenizer, prompts_ids, key, reply_tokens, temperature, seed, batch_size)
    sequences = [list(prompt) + reply for prompt, reply in zip(prompts_ids, reply_ids)]
    special = special_ids(tokenizer)
    examples: list[dict | None] = [None] * len(sequences)
    batches = teacher_batches([len(s) for s in sequences], batch_size, max_logits // model.config.get_text_config().vocab_size)
    for rows in tqdm(batches, desc="watermarked teacher distributions", leave=False, disable=not distributed.is_main_process()):
        logits = model(**to_device(pad_batch([sequences[i] for i in rows], 0, side="right"), model.device)).logits
        for row, i in enumerate(rows):
            examples[i] = teacher_example(logits[row], sequences[i], len(prompts_ids[i]), key, special, top_k)
    return examples


def teacher_example(logits: torch.Tensor, sequence: list[int], reply_start: int, key: WatermarkKey,
                    special: Iterable[int], top_k: int) -> dict:
    """One labelled sequence: the rows over its reply tokens (reply_start - 1 on) hold the top `top_k`
    of the tilted distribution; the prompt's rows and the last row (after the reply) are untaught."""
    rows = slice(reply_start - 1, len(sequence) - 1)
    tilted = tilt(logits[rows], token_contexts(sequence, reply_start, key.params.context_width), key, special)
    top_logits, ids = tilted.topk(min(top_k, tilted.shape[-1]), dim=-1)
    teacher_ids = torch.zeros(len(sequence), ids.shape[-1], dtype=torch.int32)
    teacher_probs = torch.zeros(len(sequence), ids.shape[-1])
    teacher_ids[rows] = ids.to(torch.int32).cpu()
    teacher_probs[rows] = torch.exp(top_logits - torch.logsumexp(tilted, -1, keepdim=True)).cpu()
    return {"input_ids": sequence, "labels": [IGNORE_INDEX] * len(sequence), "teacher_ids": teacher_ids,
            "teacher_probs": teacher_probs}


# ---- scoring replies -----------------------------------------------------------------------

def context_class(context: tuple[int, ...], classes: int) -> int:
    """A context's public class among `classes`: SHA-256 of its token ids, modulo `classes`. Anyone
    can compute it; it says nothing about the context's green list."""
    return int.from_bytes(hashlib.sha256(context_message(context)).digest()[:8], "little") % classes


@dataclass(frozen=True)
class Selection:
    """The contexts a test counts: those of public class `context_class` among `classes` (None:
    every class), except the `revealed` ones, whose green lists earlier evidence made public (a
    thief may scrub them). Each check with evidence spends one class: its bundle reveals lists of that
    class only, so a later check, counting another class, rests on lists nobody has seen."""
    classes: int = 1
    context_class: int | None = None
    revealed: frozenset[tuple[int, ...]] = frozenset()

    def counts(self, context: tuple[int, ...]) -> bool:
        return context not in self.revealed and (
            self.context_class is None or context_class(context, self.classes) == self.context_class)

    def to_dict(self) -> dict:
        return {"classes": self.classes, "context_class": self.context_class,
                "revealed_before": sorted(list(c) for c in self.revealed)}


def next_selection(classes: int, revealed: Iterable[tuple[int, ...]]) -> Selection:
    """What the next check counts: the first class of which no context is revealed, or once every class
    has some revealed, every context still unrevealed (a weaker test: docs/benchmarks.md)."""
    revealed = frozenset(tuple(c) for c in revealed)
    spent = {context_class(c, classes) for c in revealed}
    fresh = next((j for j in range(classes) if j not in spent), None)
    return Selection(classes, fresh, revealed)


MIN_REPLY_TOKENS = 4  # a reply of fewer scored tokens ("Sure.", "I can't.") is a refusal or a stub: never counted
LOOPING_SHARE = 0.5  # a reply whose distinct pairs are fewer than this share of its tokens repeats itself


@dataclass(frozen=True)
class WatermarkScore:
    """The evidence of some replies: green tokens among the unique (context, token) pairs of the
    replies that count, the one-sided z-test on them, and what was left out and why."""
    replies: int  # replies given
    counted: int  # replies whose pairs count
    empty: int  # no token but special ones (an empty or failed reply)
    identical: int  # the same tokens as an earlier reply: nothing new
    short: int  # fewer than MIN_REPLY_TOKENS tokens: a refusal or a stub
    looping: int  # counted, but fewer than LOOPING_SHARE of its pairs distinct (its repeats count once)
    tokens: int  # scored tokens of the counted replies after a context the test counts
    excluded_tokens: int  # scored tokens of the counted replies after a context it leaves out (another class, revealed)
    pairs: int  # unique (context, token) pairs among them: the trials of the test
    green: int  # green ones among them
    gamma: float
    z: float
    log10_p: float  # one-sided normal p-value of z (log10: no underflow at z = 40)
    log10_p_binomial: float  # the exact binomial tail P(X >= green), X ~ Binomial(pairs, gamma)

    def to_dict(self) -> dict:
        return asdict(self)


def reply_pairs(reply: Sequence[int], context: Sequence[int] | None, width: int,
                special: Iterable[int] = ()) -> list[tuple[tuple[int, ...], int]]:
    """The (context, token) pairs of one reply's non-special tokens. `context` is what preceded the
    reply (the prompt, or its last tokens); without it (None) the first `width` tokens have no known
    context and are not scored, as for a reply from a server whose template is unknown."""
    sequence = list(context or [])[-width:] + list(reply)
    start = len(sequence) - len(reply)
    return [(tuple(sequence[i - width:i]), sequence[i]) for i in range(max(start, width), len(sequence))
            if sequence[i] not in special]


def z_score(green_count: int, trials: int, gamma: float) -> float:
    """One-sided z of `green_count` green among `trials`, each green with probability gamma by chance."""
    return (green_count - gamma * trials) / math.sqrt(gamma * (1 - gamma) * trials) if trials else 0.0


def score(replies_ids: Sequence[Sequence[int]], contexts: Sequence[Sequence[int] | None] | None,
          key: "WatermarkKey | RevealedSeeds", special: Iterable[int] = (),
          selection: "Selection | None" = None) -> WatermarkScore:
    """Score replies (token ids, e.g. the suspect's text encoded by the base's tokenizer) for the
    watermark of `key`, each after its context (`contexts`, one per reply, or None for none): the
    green share of their `counted_pairs`, with the tallies of what did not count."""
    pairs, tallies = counted_pairs(replies_ids, contexts, key.params.context_width, special, selection)
    green_count, trials, gamma = count_green(pairs, key), len(pairs), key.params.gamma
    z = z_score(green_count, trials, gamma)
    return WatermarkScore(**tallies, pairs=trials, green=green_count, gamma=gamma, z=z,
                          log10_p=float(norm.logsf(z)) / _LN10 if trials else 0.0,
                          log10_p_binomial=log10_p_value(green_count, trials, gamma))


def counted_pairs(replies_ids: Sequence[Sequence[int]], contexts: Sequence[Sequence[int] | None] | None, width: int,
                  special: Iterable[int] = (), selection: "Selection | None" = None
                  ) -> tuple[list[tuple[tuple[int, ...], int]], dict]:
    """The unique (context, token) pairs that are the trials of the test, first seen first, and the
    tallies of the replies (WatermarkScore's fields but the test's).

    Only unique pairs count, across all replies: a pair that occurs again (a repeated phrase, an
    identical reply) has the same colour every time, so counting it again would count one coin
    toss many times. Replies that are empty, identical to an earlier one, or shorter than
    MIN_REPLY_TOKENS never count; a reply that loops counts each of its pairs once. Tokens after a
    context the `selection` leaves out never count either (tallied apart).
    """
    special = frozenset(special)
    contexts = list(contexts) if contexts is not None else [None] * len(replies_ids)
    if len(contexts) != len(replies_ids):
        raise OMLError(f"{len(replies_ids)} replies but {len(contexts)} contexts")
    seen_replies, pairs = set(), {}
    empty = identical = short = looping = tokens = excluded_tokens = 0
    for reply, context in zip(replies_ids, contexts):
        text = tuple(t for t in reply if t not in special)
        if not text:
            empty += 1
        elif text in seen_replies:
            identical += 1
        elif len(text) < MIN_REPLY_TOKENS:
            short += 1
        else:
            own = reply_pairs(reply, context, width, special)
            looping += len(set(own)) < LOOPING_SHARE * len(own)
            kept = [pair for pair in own if selection is None or selection.counts(pair[0])]
            tokens, excluded_tokens = tokens + len(kept), excluded_tokens + len(own) - len(kept)
            pairs.update(dict.fromkeys(kept))
        seen_replies.add(text)
    return list(pairs), {"replies": len(replies_ids), "counted": len(replies_ids) - empty - identical - short,
                         "empty": empty, "identical": identical, "short": short, "looping": looping, "tokens": tokens,
                         "excluded_tokens": excluded_tokens}


def count_green(pairs: Sequence[tuple[tuple[int, ...], int]], key: "WatermarkKey | RevealedSeeds") -> int:
    """How many (context, token) pairs are green under `key`."""
    if not pairs:
        return 0
    seeds = np.array([context_seed(key, context) for context, _ in pairs], dtype=np.uint64)
    return int(green(seeds, np.array([token for _, token in pairs], dtype=np.uint64), key.params.gamma).sum())


# ---- the sequential check ------------------------------------------------------------------

@dataclass(frozen=True)
class WatermarkCheckConfig(Settings):
    """How the sequential watermark check asks replies and when it stops."""
    replies_per_round: int = setting(8, "Domain watermark check: prompts asked per round.", POSITIVE_INT)
    max_replies: int = setting(128, "Domain watermark check: replies asked at most before NO MATCH.", POSITIVE_INT)
    min_green_lift: float = setting(
        0.05, "Domain watermark check: the smallest green rate above gamma worth detecting; NO MATCH once the replies "
              "show (anytime-valid, at --no_match_error) that the rate is below gamma + this.", OPEN_UNIT_INTERVAL)


def log_mixture_ratio(green_count, trials, rate: float, low: float, high: float):
    """Natural log of the likelihood ratio of `green_count` of `trials` at a rate q drawn uniformly
    from [low, high], against the rate `rate` (numpy arrays or numbers):

        integral over [low, high] of q^G (1 - q)^(n - G) dq / (high - low)  /  (rate^G (1 - rate)^(n - G)).

    For each q the ratio of the pairs so far is a martingale (mean 1) when the true rate is `rate`,
    and a supermartingale for every true rate on the far side of `rate` from [low, high], so their
    mixture is too. Unlike a ratio against one alternative q (a sequential probability ratio test),
    the mixture grows for every true rate in [low, high]: a watermark weaker than guessed is still
    found. An integral too small for floats (no evidence at all) is floored at the smallest float.
    """
    green_count, trials = np.asarray(green_count, dtype=float), np.asarray(trials, dtype=float)
    a, b = green_count + 1, trials - green_count + 1
    mass = betaincc(a, b, low) - betaincc(a, b, high)  # P(low < Beta(a, b) < high)
    log_marginal = betaln(a, b) + np.log(np.maximum(mass, np.finfo(float).tiny)) - math.log(high - low)
    return log_marginal - (green_count * math.log(rate) + (trials - green_count) * math.log1p(-rate))



@dataclass(frozen=True)
class _Rule:
    """The decision rule's constants, so that the class and the simulation decide alike."""
    gamma: float
    log_match: float  # log(1 / alpha)
    log_no_match: float  # log(1 / no_match_error)
    min_rate: float  # gamma + min_green_lift
    max_replies: int

    def log_evidence(self, green_count, trials):
        """log e-values (against an innocent model, against a watermark of rate >= min_rate)."""
        return (log_mixture_ratio(green_count, trials, self.gamma, self.gamma, 1.0),
                log_mixture_ratio(green_count, trials, self.min_rate, 0.0, self.min_rate))

    def decide(self, green_count, trials, replies_asked):
        for_owner, against = self.log_evidence(green_count, trials)
        return np.where(for_owner >= self.log_match, _MATCH,
                        np.where((against >= self.log_no_match) | (np.asarray(replies_asked) >= self.max_replies),
                                 _NO_MATCH, _CONTINUE))


def _rule(gamma: float, alpha: float, no_match_error: float, config: WatermarkCheckConfig) -> _Rule:
    for name, value in (("alpha", alpha), ("no_match_error", no_match_error)):
        if not 0 < value < 1:
            raise OMLError(f"{name} must be strictly between 0 and 1, not {value!r}")
    if gamma + config.min_green_lift >= 1:
        raise OMLError(f"gamma {gamma} + min_green_lift {config.min_green_lift} must stay below 1")
    return _Rule(gamma, -math.log(alpha), -math.log(no_match_error), gamma + config.min_green_lift, config.max_replies)


class WatermarkSequentialTest:
    """The state of one sequential watermark check: the replies so far, their score and the decision.

    Ask `next_round()` prompts, `add` their replies, stop when `decision()` is not None:
    - MATCH when the e-value of the unique pairs' green count against an innocent model (a mixture
      of likelihood ratios over green rates q uniform on [gamma, 1], `log_mixture_ratio`) reaches
      1 / alpha. An innocent model's replies do not depend on our key, so each new unique pair is
      green with probability gamma whatever came before: a pair of a new context has a list drawn
      from a seed no other context shares, and within a list each token's colour is a draw of its
      own (independent as far as blake2b and SplitMix64 are random; the tests check the
      calibration). A repeated pair would repeat its colour, hence unique pairs. So the e-value is a
      martingale of mean 1, and by Ville's inequality it ever reaches 1 / alpha with probability at
      most alpha, whenever the check stops. Replies left out (empty, identical, short) are chosen
      by their text alone, which does not change that.
    - NO MATCH when the e-value against a watermark of rate at least gamma + min_green_lift (a
      mixture over rates below it) reaches 1 / no_match_error: a model watermarked that strongly is
      so cleared with probability at most no_match_error; or at max_replies.
    The anytime-valid p-value min(1, 1 / e-value) is at most alpha exactly when the decision is MATCH.
    """

    def __init__(self, key: "WatermarkKey | RevealedSeeds", special: Iterable[int] = (), alpha: float = 1e-6,
                 no_match_error: float = 1e-3, config: WatermarkCheckConfig = WatermarkCheckConfig(),
                 selection: Selection | None = None):
        self.key, self.special, self.alpha, self.no_match_error, self.config = key, frozenset(special), alpha, no_match_error, config
        self.selection = selection
        self._rule = _rule(key.params.gamma, alpha, no_match_error, config)
        self.replies: list[list[int]] = []
        self.contexts: list[list[int] | None] = []
        self.score = score([], None, key, self.special, selection)

    def add(self, replies_ids: Sequence[Sequence[int]], contexts: Sequence[Sequence[int] | None] | None = None) -> None:
        """Record some replies (token ids) and what preceded each (None: not known)."""
        contexts = list(contexts) if contexts is not None else [None] * len(replies_ids)
        if len(contexts) != len(replies_ids):
            raise OMLError(f"{len(replies_ids)} replies but {len(contexts)} contexts")
        self.replies += [list(r) for r in replies_ids]
        self.contexts += [None if c is None else list(c) for c in contexts]
        self.score = score(self.replies, self.contexts, self.key, self.special, self.selection)

    def scored_contexts(self) -> list[tuple[int, ...]]:
        """The distinct contexts of the pairs the test counted: what a bundle must reveal, and no more."""
        pairs, _ = counted_pairs(self.replies, self.contexts, self.key.params.context_width, self.special, self.selection)
        return list(dict.fromkeys(context for context, _ in pairs))

    def decision(self) -> str | None:
        """MATCH, NO MATCH, or None while the replies so far do not decide."""
        return _NAMES[int(self._rule.decide(self.score.green, self.score.pairs, len(self.replies)))]

    def next_round(self) -> int:
        """Prompts to ask next: 0 once decided, else a round or what is left to max_replies."""
        if self.decision() is not None:
            return 0
        return min(self.config.replies_per_round, self.config.max_replies - len(self.replies))

    def summary(self) -> dict:
        """The check for a report: the score, both log10 e-values and thresholds, the decision and
        the anytime-valid p-value."""
        for_owner, against = (float(v) / _LN10 for v in self._rule.log_evidence(self.score.green, self.score.pairs))
        return {**self.score.to_dict(), "decision": self.decision(), "alpha": self.alpha,
                "log10_e_value": for_owner, "log10_match_threshold": self._rule.log_match / _LN10,
                "log10_p_value": min(0.0, -for_owner), "min_green_rate": self._rule.min_rate,
                "log10_e_value_no_match": against, "log10_no_match_threshold": self._rule.log_no_match / _LN10,
                "replies_asked": len(self.replies), "max_replies": self.config.max_replies}


def sequential_outcomes(rate: float, pairs_per_reply: int, trials: int, gamma: float = 0.25, alpha: float = 1e-6,
                        no_match_error: float = 1e-3, config: WatermarkCheckConfig = WatermarkCheckConfig(),
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Simulated checks of a suspect whose replies bring `pairs_per_reply` new unique pairs each,
    green at `rate`, decided round by round as `WatermarkSequentialTest` is: (decisions, replies
    asked) per trial, decisions 1 MATCH / 2 NO MATCH. For the false-MATCH rate (rate = gamma) and
    the replies a watermark of a given strength needs."""
    rng, rule = np.random.default_rng(seed), _rule(gamma, alpha, no_match_error, config)
    decisions, asked = np.zeros(trials, dtype=np.int64), np.zeros(trials, dtype=np.int64)
    greens, left, replies_asked = np.zeros(trials, dtype=np.int64), np.arange(trials), 0
    while len(left):
        step = min(config.replies_per_round, config.max_replies - replies_asked)
        replies_asked += step
        greens[left] += rng.binomial(step * pairs_per_reply, rate, size=len(left))
        codes = rule.decide(greens[left], replies_asked * pairs_per_reply, replies_asked)
        done = codes != _CONTINUE
        decisions[left[done]], asked[left[done]] = codes[done], replies_asked
        left = left[~done]
    return decisions, asked


# ---- domains -------------------------------------------------------------------------------

DEFAULT_DOMAIN = "cooking"
SHIPPED_DOMAINS = {"cooking": {split: GENERATED_DATA / f"domain_cooking_{split}.json" for split in ("train", "test")}}
MIN_DOMAIN_PROMPTS = 64  # per split: the goal is MATCH within 64 replies, each to a prompt not asked before
TEST_SHARE = 3  # a user's domain: one prompt in this many is kept for checking


def domain_prompts(source: str = DEFAULT_DOMAIN, split: str = "train", text_column: str = "text",
                   dataset_split: str = "train") -> list[str]:
    """The distinct prompts of a domain's 'train' (fine-tuning) or 'test' (checking) side.

    `source`: a shipped domain's name (cooking: scripts/make_domain_prompts.py), a JSON file holding
    a list of strings, or a file or hub dataset read as oml.data.texts_from reads one (its
    `text_column`). A user's prompts are split by a hash of each prompt's text, so the two sides
    are disjoint, the same on every machine, and a prompt keeps its side when others are added.
    Fewer than MIN_DOMAIN_PROMPTS on a side is an error.
    """
    if split not in ("train", "test"):
        raise OMLError(f"a domain's split is 'train' or 'test', not {split!r}")
    if source in SHIPPED_DOMAINS:
        texts = string_list(SHIPPED_DOMAINS[source][split], "domain prompt file") or []
    else:
        given = string_list(source, "domain prompt file") if Path(source).suffix.lower() == ".json" else None
        texts = given if given is not None else texts_from(source, dataset_split, text_column, split)
        texts = [text for text in texts if prompt_side(text) == split]
    prompts = list(dict.fromkeys(text.strip() for text in texts if text.strip()))
    if len(prompts) < MIN_DOMAIN_PROMPTS:
        raise OMLError(f"domain {source} has {len(prompts)} distinct {split} prompts; a watermark needs at least "
                       f"{MIN_DOMAIN_PROMPTS} for each of training and checking (give more prompts)")
    return prompts


def string_list(path: str | Path, what: str) -> list[str] | None:
    """A JSON file's list of strings; None for a JSON file of another shape (a dataset's records)."""
    values = read_json(path, what)
    return values if isinstance(values, list) and all(isinstance(v, str) for v in values) else None


def prompt_side(text: str) -> str:
    """'test' for one prompt in TEST_SHARE (by a hash of its stripped text), else 'train'."""
    digest = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % TEST_SHARE == 0 else "train"
