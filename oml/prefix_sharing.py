"""Forward passes that compute a prefix every row of a batch shares once: chat prompts all open
with the same chat template and system prompt (25 of the embedded model's 44 tokens of a chat
key), and a system-prompt check asks every key inside one template. Training (length-grouped
batches) and checking (one query per batch) both use it."""
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from oml.tokenization import pad_batch

MIN_SHARED_PREFIX = 8  # tokens: below this, a second forward call costs more than computing the prefix per row saves


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every row of the batch shares (real tokens, not padding)."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return int(same.long().cumprod(0).sum())


def logits_sharing_prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          logits_to_keep: int = 0) -> torch.Tensor:
    """The batch's logits (the last `logits_to_keep` columns; 0: all), with the prefix all rows share
    computed once. The prefix runs as one row with a cache, which is repeated for every row, and the
    rows go on from it: the same logits and gradients as the whole batch at once (up to float
    rounding), since gradients through the repeated cache add up as the per-row ones would. Rows may
    be padded after the prefix (masked columns between it and their own tokens)."""
    rows, width = input_ids.shape
    prefix = shared_prefix_length(input_ids, attention_mask)
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}  # not passed when all are kept: not every model takes it
    if logits_to_keep:
        prefix = min(prefix, width - logits_to_keep)  # the kept columns all come from the rows' own pass
    if rows < 2 or prefix < MIN_SHARED_PREFIX or prefix == width:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **keep).logits
    head = model(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix],
                 position_ids=position_ids[:1, :prefix], use_cache=True, **({"logits_to_keep": 1} if logits_to_keep else {}))
    if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in getattr(head.cache, "layers", [None])):
        # not a plain attention cache (state-space or linear-attention layers): computed per row
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **keep).logits
    head.cache.batch_repeat_interleave(rows)
    tail = model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=position_ids[:, prefix:],
                 cache=head.cache, use_cache=True, **keep)
    return tail.logits if logits_to_keep else torch.cat([head.logits.expand(rows, -1, -1), tail.logits], dim=1)


def padded_after_prefix(sequences: list[list[int]], pad_id: int) -> dict:
    """A batch of sequences that end at the last column, as left padding gives, but with the
    leading tokens they all share kept at the start and the padding after them:
    then `logits_sharing_prefix` computes those tokens once. Positions count real tokens, as
    `pad_batch` does, so the logits are those of the left-padded batch."""
    shared = 0
    shortest = min(map(len, sequences))
    while shared < shortest - 1 and all(s[shared] == sequences[0][shared] for s in sequences):
        shared += 1
    rest = pad_batch([s[shared:] for s in sequences], pad_id, side="left")
    rows = len(sequences)
    return {"input_ids": torch.cat([torch.tensor([sequences[0][:shared]] * rows, dtype=torch.long).view(rows, shared),
                                    rest["input_ids"]], dim=1),
            "attention_mask": torch.cat([torch.ones(rows, shared, dtype=torch.long), rest["attention_mask"]], dim=1),
            "position_ids": torch.cat([torch.arange(shared).expand(rows, shared), rest["position_ids"] + shared], dim=1)}


def checks_share_prefix(model, width: int) -> bool:
    """Whether a check may compute its batch's shared prefix once: not where the weights are
    partitioned across ranks (DeepSpeed ZeRO-3: each forward call gathers them from every rank, so
    all ranks must make the same calls), nor where a sliding attention window is narrower than the
    batch (windows count columns, and padding after the prefix would shift them)."""
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return not any(hasattr(p, "ds_id") for p in model.parameters()) and not (window and width > window)
