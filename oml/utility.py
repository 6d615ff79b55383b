"""What fingerprinting costs: how far a fingerprinted model drifts from its base on benign input.

Every measure compares the two models on the same tokens, so they must share a tokenizer
(a fingerprinted model always does: fine-tuning saves the base tokenizer beside it).
"""
import math

import torch
from tqdm import tqdm

from oml.tokenization import IGNORE_INDEX, encode, pad_batch, special_prefix, to_device

MMLU_LETTERS = ("A", "B", "C", "D")


def text_sequences(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (after the tokenizer's special prefix), cut to `max_length`."""
    return [(special_prefix(tokenizer) + encode(tokenizer, text))[:max_length] for text in texts]


@torch.no_grad()
def next_token_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-probabilities (float32, on CPU) of every next token of a right-padded batch."""
    logits = model(**to_device(batch, model.device)).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def compare_on_texts(model, base, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> dict:
    """Perplexity of both models, greedy next-token agreement and mean KL(base || model) per token.

    Agreement and KL look at every position of benign text, not only at the end, because a
    fingerprint that leaks into ordinary text shows up as a changed next-token distribution
    long before it moves the perplexity.
    """
    sums = {"nll_model": 0.0, "nll_base": 0.0, "kl": 0.0, "agree": 0}
    tokens = 0
    sequences = text_sequences(tokenizer, texts, max_length)
    for start in tqdm(range(0, len(sequences), batch_size), desc="benign text", leave=False):
        chunk = sequences[start:start + batch_size]
        batch = pad_batch(chunk, tokenizer.pad_token_id, side="right", labels=chunk)
        targets = batch.pop("labels")[:, 1:]
        real = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0).unsqueeze(-1)
        logp_model, logp_base = next_token_logprobs(model, batch), next_token_logprobs(base, batch)
        sums["nll_model"] -= float(logp_model.gather(-1, safe_targets).squeeze(-1)[real].sum())
        sums["nll_base"] -= float(logp_base.gather(-1, safe_targets).squeeze(-1)[real].sum())
        kl = (logp_base.exp() * (logp_base - logp_model)).sum(-1)
        sums["kl"] += float(kl[real].sum())
        sums["agree"] += int((logp_model.argmax(-1) == logp_base.argmax(-1))[real].sum())
        tokens += int(real.sum())
    return {
        "perplexity": math.exp(sums["nll_model"] / tokens),
        "base_perplexity": math.exp(sums["nll_base"] / tokens),
        "next_token_agreement": sums["agree"] / tokens,
        "mean_kl_from_base": sums["kl"] / tokens,
        "tokens": tokens,
    }


def mmlu_prompt(item: dict) -> str:
    """A zero-shot multiple-choice prompt that ends where the answer letter goes."""
    subject = item.get("topic", "general knowledge")
    options = "\n".join(f"{letter}. {item['answer_' + letter.lower()]}" for letter in MMLU_LETTERS)
    return f"The following is a multiple choice question about {subject}.\n\n{item['question']}\n{options}\nAnswer:"


def letter_ids(tokenizer) -> list[int]:
    """The token of ' A', ' B', ' C', ' D' (each must be a single token)."""
    ids = [encode(tokenizer, " " + letter) for letter in MMLU_LETTERS]
    if any(len(i) != 1 for i in ids):
        ids = [encode(tokenizer, letter) for letter in MMLU_LETTERS]
    return [i[-1] for i in ids]


@torch.no_grad()
def mmlu_accuracy(model, tokenizer, items: list[dict], batch_size: int = 8, max_length: int = 1024) -> float:
    """Zero-shot MMLU accuracy: the answer is the letter with the highest next-token logit."""
    letters = torch.tensor(letter_ids(tokenizer))
    prompts = [(special_prefix(tokenizer) + encode(tokenizer, mmlu_prompt(item)))[-max_length:] for item in items]
    correct = 0
    for start in tqdm(range(0, len(prompts), batch_size), desc="MMLU", leave=False):
        batch = pad_batch(prompts[start:start + batch_size], tokenizer.pad_token_id, side="left")
        logits = model(**to_device(batch, model.device), logits_to_keep=1).logits[:, -1].float().cpu()
        chosen = logits[:, letters].argmax(-1).tolist()
        for item, choice in zip(items[start:start + batch_size], chosen):
            correct += MMLU_LETTERS[choice] == item["correct_answer"]
    return correct / len(items)
