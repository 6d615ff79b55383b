"""What fingerprinting costs: how far a fingerprinted model drifts from its base on benign input.

Every measure compares the two models on the same tokens, so they must share a tokenizer
(a fingerprinted model always does: fine-tuning saves the base tokenizer beside it).
"""
import math

import torch
from tqdm import tqdm

from oml import OMLError
from oml.decoding import Decoding
from oml.tokenization import IGNORE_INDEX, chat_example, encode, pad_batch, special_prefix, to_device

MMLU_LETTERS = ("A", "B", "C", "D")


def text_examples(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """Each text (after the tokenizer's special prefix), cut to `max_length` tokens, every token scored."""
    sequences = [(special_prefix(tokenizer) + encode(tokenizer, text))[:max_length] for text in texts]
    return [{"input_ids": ids, "labels": ids} for ids in sequences]


def chat_examples(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[dict]:
    """(message, reply) exchanges in the model's chat template, the reply's tokens (its first above
    all, where chat-format fingerprints are answered) scored."""
    return [chat_example(tokenizer, message, reply, max_length) for message, reply in pairs]


def scored_batches(tokenizer, examples: list[dict], batch_size: int, desc: str | None = None):
    """Right-padded batches of `examples` ({"input_ids", "labels"}), each with its next-token
    targets and the mask of scored positions."""
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=desc is None):
        chunk = examples[start:start + batch_size]
        batch = pad_batch([e["input_ids"] for e in chunk], tokenizer.pad_token_id, side="right", labels=[e["labels"] for e in chunk])
        targets = batch.pop("labels")[:, 1:]
        yield batch, targets, targets != IGNORE_INDEX


@torch.no_grad()
def next_token_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-probabilities (float32, on CPU) of every next token of a right-padded batch."""
    logits = model(**to_device(batch, model.device)).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def kl_per_position(logp_base: torch.Tensor, logp_model: torch.Tensor) -> torch.Tensor:
    """KL(base || model) at each position, from both models' next-token log-probabilities."""
    return (logp_base.exp() * (logp_base - logp_model)).sum(-1)


@torch.no_grad()
def compare_on_texts(model, base, tokenizer, examples: list[dict], batch_size: int = 8) -> dict:
    """Perplexity of both models, greedy next-token agreement and mean KL(base || model) per token,
    over the scored tokens of `examples` ({"input_ids", "labels"}, as `text_examples` makes).

    Agreement and KL look at every scored position, not only at the end, because a fingerprint
    that leaks into ordinary text shows up as a changed next-token distribution long before it
    moves the perplexity.
    """
    sums = {"nll_model": 0.0, "nll_base": 0.0, "kl": 0.0, "agree": 0}
    tokens = 0
    for batch, targets, real in scored_batches(tokenizer, examples, batch_size, "benign text"):
        safe_targets = targets.clamp(min=0).unsqueeze(-1)
        logp_model, logp_base = next_token_logprobs(model, batch), next_token_logprobs(base, batch)
        sums["nll_model"] -= float(logp_model.gather(-1, safe_targets).squeeze(-1)[real].sum())
        sums["nll_base"] -= float(logp_base.gather(-1, safe_targets).squeeze(-1)[real].sum())
        sums["kl"] += float(kl_per_position(logp_base, logp_model)[real].sum())
        sums["agree"] += int((logp_model.argmax(-1) == logp_base.argmax(-1))[real].sum())
        tokens += int(real.sum())
    if not tokens:
        raise OMLError("no tokens to compare: the texts are empty after tokenisation")
    return {
        "perplexity": math.exp(sums["nll_model"] / tokens),
        "base_perplexity": math.exp(sums["nll_base"] / tokens),
        "next_token_agreement": sums["agree"] / tokens,
        "mean_kl_from_base": sums["kl"] / tokens,
        "tokens": tokens,
    }


@torch.no_grad()
def altered_share(model, tokenizer, examples: list[dict], decoding: Decoding, batch_size: int = 8) -> float:
    """A decoding attack's utility cost: the share of the scored positions of benign `examples` that
    it acts on (the first `decoding.num_tokens` of each, or all) where it serves another token than
    greedy decoding. Teacher-forced, like the checker: every position follows the example's own
    tokens, and what comes before an example's first scored token is the prompt it answers."""
    changed = positions = 0
    for batch, _, real in scored_batches(tokenizer, examples, batch_size):
        logits = model(**to_device(batch, model.device)).logits[:, :-1].float()
        real = real.to(logits.device)
        first = real.int().argmax(-1)
        prompts = [ids[:start + 1] for ids, start in zip(batch["input_ids"].tolist(), first.tolist())]
        counted = real & decoding.window(first, real.shape[1])
        served = decoding.serve(model, tokenizer, prompts, logits, first)
        changed += int(((served != logits.argmax(-1)) & counted).sum())
        positions += int(counted.sum())
    return changed / positions


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
