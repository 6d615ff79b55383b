"""How much a fingerprinted model still behaves like its base: perplexity and agreement."""
import math

import torch
from tqdm import tqdm

from oml.tokenization import encode, pad_batch, special_prefix, to_device


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """Token-level perplexity over `texts`, each cut to `max_length` tokens."""
    sequences = [(special_prefix(tokenizer) + encode(tokenizer, text))[:max_length] for text in texts]
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(sequences), batch_size), desc="perplexity", leave=False):
        chunk = sequences[start:start + batch_size]
        batch = pad_batch(chunk, tokenizer.pad_token_id, side="right", labels=chunk)
        batch = to_device(batch, model.device)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / total_tokens)
