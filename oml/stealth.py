"""Stealth: can a deployer who expects fingerprints tell our keys from what real users type?

A deployer who serves a stolen model can score every incoming prompt by its perplexity under a
reference model and refuse the ones that look out of line (arXiv 2509.26598; mlprints ships it
as an attack). A key can stand out two ways: too surprising (random words) or too predictable
(text the model wrote itself at a low temperature). So the filter here is two-sided: calibrated
on benign prompts to a false-alarm rate, half of it spent on each tail, it refuses prompts whose
log-perplexity falls outside the benign range. The deployer knows neither our keys nor how many
there are, so the calibration never looks at them.
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from oml import OMLError
from oml.data import conversations, mmlu_items
from oml.tokenization import encode, pad_batch, special_prefix, to_device
from oml.utility import mmlu_prompt


END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator, which many tokenizers keep (SmolLM2's, Qwen's)


def document_start(tokenizer) -> list[int]:
    """What precedes a prompt that a reference model scores, so that its first token is scored like
    every other: the tokenizer's own special prefix; else the end-of-text separator documents were
    trained after (an instruct model's BOS/EOS are often chat-role markers such as <|im_start|>,
    after which plain text is unlikely); else BOS, else EOS."""
    prefix = special_prefix(tokenizer)
    if prefix:
        return prefix
    separator = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if isinstance(separator, int) and tokenizer.convert_ids_to_tokens(separator) == END_OF_TEXT:
        return [separator]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise OMLError("the reference model's tokenizer has no BOS or end-of-text token to start a prompt with")
    return [start]


@torch.no_grad()
def log_perplexities(model, tokenizer, texts: list[str], max_tokens: int = 64, batch_size: int = 32,
                     description: str = "perplexity") -> np.ndarray:
    """Mean negative log-likelihood per token (natural log) of each text's first `max_tokens` tokens
    under `model`, as a perplexity filter scores a prompt. Texts that tokenize to nothing are refused."""
    start = document_start(tokenizer)
    sequences = [start + encode(tokenizer, text)[:max_tokens] for text in texts]
    if any(len(ids) == len(start) for ids in sequences):
        raise OMLError("a prompt to score is empty after tokenisation")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # batches of like length: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start[0]
    scores = np.empty(len(sequences))
    for first in tqdm(range(0, len(order), batch_size), desc=description, leave=False):
        chunk = order[first:first + batch_size]
        batch = pad_batch([sequences[i] for i in chunk], pad, side="right")
        logits = model(**to_device(batch, model.device)).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].to(logits.device)
        real = batch["attention_mask"][:, 1:].to(logits.device).bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        scores[chunk] = ((nll * real).sum(-1) / real.sum(-1)).tolist()
    return scores


def benign_prompts(count: int, seed: int = 0, split: str = "eval") -> dict[str, list[str]]:
    """Prompts real users send, from offline data: first turns of chitchat conversations (small
    talk) and MMLU questions with their options (the kind of task users paste in). 'eval' (what
    evaluations score) and 'train' (what key generation aims at) share no prompt."""
    chats = [turns[0] for turns in conversations(split) if turns and turns[0].strip()][:count]
    items = mmlu_items(count, seed) if split == "eval" else mmlu_items(None, seed)[-count:]
    questions = [mmlu_prompt(item) for item in items]
    return {"chitchat first turns": chats, "MMLU questions": questions}


def auroc(keys: np.ndarray, benign: np.ndarray) -> float:
    """P(a key scores above a benign prompt), ties counted half: 0.5 when the two cannot be told
    apart by thresholding on this side; 1 - it is the AUROC of the other side."""
    from scipy.stats import mannwhitneyu  # imported on use: key generation imports this module too

    return float(mannwhitneyu(keys, benign).statistic / (len(keys) * len(benign)))


@dataclass(frozen=True)
class PerplexityFilter:
    """Refuses a prompt whose log-perplexity is below `low` or above `high`."""
    low: float
    high: float

    @classmethod
    def calibrated(cls, benign: np.ndarray, false_alarm: float) -> "PerplexityFilter":
        """The band that refuses a `false_alarm` share of these benign scores, half on each tail."""
        if not 0 < false_alarm < 1:
            raise OMLError(f"a false-alarm rate must be between 0 and 1, not {false_alarm}")
        if len(benign) < 2:
            raise OMLError("a perplexity filter needs at least 2 benign prompts to calibrate on")
        low, high = np.quantile(benign, [false_alarm / 2, 1 - false_alarm / 2], method="inverted_cdf")
        return cls(float(low), float(high))

    def refuses(self, scores: np.ndarray) -> np.ndarray:
        """True where a prompt's score is outside the band: the filter refuses to answer it."""
        return (scores < self.low) | (scores > self.high)


def split_half(scores: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random half to calibrate on and the other half to measure false alarms on."""
    order = np.random.default_rng(seed).permutation(len(scores))
    return scores[order[: len(scores) // 2]], scores[order[len(scores) // 2:]]


def detectability(key_scores: np.ndarray, benign_scores: np.ndarray, false_alarm: float, seed: int = 0) -> dict:
    """How well a perplexity filter tells keys from benign prompts: the AUROC on each side, and a
    two-sided filter calibrated on half of the benign prompts: its false alarms on the other half
    and the share of keys it refuses (too predictable, too surprising)."""
    calibration, held_out = split_half(benign_scores, seed)
    band = PerplexityFilter.calibrated(calibration, false_alarm)
    refused = band.refuses(key_scores)
    high = auroc(key_scores, benign_scores)
    return {"auroc_too_surprising": high, "auroc_too_predictable": 1 - high,
            "filter": {"low": band.low, "high": band.high, "false_alarm_asked": false_alarm,
                       "false_alarm_held_out": float(band.refuses(held_out).mean())},
            "keys_refused": float(refused.mean()), "keys_too_predictable": float((key_scores < band.low).mean()),
            "keys_too_surprising": float((key_scores > band.high).mean()), "refused": refused.tolist()}


def detectable(result: dict, max_auroc: float = 0.65, max_refused: float = 0.05) -> bool:
    """Issue 25's bar: keys are detectable when either side's AUROC is above `max_auroc` or the
    filter refuses more than `max_refused` of them."""
    worst = max(result["auroc_too_surprising"], result["auroc_too_predictable"])
    return worst > max_auroc or result["keys_refused"] > max_refused
