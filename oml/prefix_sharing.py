"""Forward passes that compute a prefix every row of a batch shares once: chat prompts all open
with the same chat template and system prompt (25 of the embedded model's 44 tokens of a chat
key), and a system-prompt check asks every key inside one template. Training (length-grouped,
right-padded batches) and checking (one query per batch, prompts ending at the last column) both
use it. Where ranks must run the same forward calls in step it is off: for training see
`backend.can_share_prefix`, for checks `checks_share_prefix`."""
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from oml.tokenization import pad_batch, to_device

MIN_SHARED_PREFIX = 8  # tokens: below this, a second forward call costs more than computing the prefix per row saves
ATTENTION_LAYERS = {"full_attention", "sliding_attention"}  # layer types whose cache can be repeated for every row


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every row of the batch shares (real tokens, not padding)."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return int(same.long().cumprod(0).sum())


def attention_only(model) -> bool:
    """Whether the model declares only attention layers (state-space, linear-attention or
    convolution layers keep a state that a repeated key/value cache does not describe). `model` may
    be wrapped for training (a DeepSpeed engine's own `config` is its ZeRO settings)."""
    config = getattr(model, "module", model).config.get_text_config()
    return set(getattr(config, "layer_types", None) or ATTENTION_LAYERS) <= ATTENTION_LAYERS


def logits_sharing_prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          logits_to_keep: int = 0) -> torch.Tensor:
    """The batch's logits (the last `logits_to_keep` columns; 0: all), with the prefix all rows share
    computed once. The prefix runs as one row with a cache, which is repeated for every row, and the
    rows go on from it: the same logits and gradients as the whole batch at once (up to float
    rounding), since gradients through the repeated cache add up as the per-row ones would. Rows may
    be padded after the prefix (masked columns between it and their own tokens)."""
    rows, width = input_ids.shape
    prefix = shared_prefix_length(input_ids, attention_mask)
    if logits_to_keep:
        prefix = min(prefix, width - logits_to_keep)  # the kept columns all come from the rows' own pass
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}  # not passed when all are kept: not every model takes it
    if rows > 1 and MIN_SHARED_PREFIX <= prefix < width and attention_only(model):
        head = model(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix],
                     position_ids=position_ids[:1, :prefix], use_cache=True, **({"logits_to_keep": 1} if logits_to_keep else {}))
        if all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in getattr(head.cache, "layers", [None])):
            head.cache.batch_repeat_interleave(rows)
            tail = model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=position_ids[:, prefix:],
                         cache=head.cache, use_cache=True, **keep)
            return tail.logits if logits_to_keep else torch.cat([head.logits.expand(rows, -1, -1), tail.logits], dim=1)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **keep).logits


def common_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least its last token: that token's
    logits predict the continuation, so it must sit right before it."""
    shared, shortest = 0, min(map(len, prompts))
    while shared < shortest - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return shared


def padded_after_prefix(sequences: list[list[int]], pad_id: int, shared: int) -> dict:
    """A batch of sequences that end at the last column, as left padding gives, but with their first
    `shared` tokens (the same in every row) kept at the start and the padding after them. Positions
    count real tokens, as `pad_batch` does, so the logits are those of the left-padded batch."""
    rest = pad_batch([s[shared:] for s in sequences], pad_id, side="left")
    rows = len(sequences)
    return {"input_ids": torch.cat([torch.tensor(sequences[0][:shared], dtype=torch.long).expand(rows, -1), rest["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones(rows, shared, dtype=torch.long), rest["attention_mask"]], 1),
            "position_ids": torch.cat([torch.arange(shared).expand(rows, -1), rest["position_ids"] + shared], 1)}


def checks_share_prefix(model, width: int) -> bool:
    """Whether a check may compute its batch's shared prefix once: not where the weights are
    partitioned across ranks (DeepSpeed ZeRO-3: each forward call gathers them from every rank, so
    all ranks must make the same calls), nor where a sliding attention window is narrower than the
    batch (windows count columns, and padding after the prefix would shift them)."""
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return not any(hasattr(p, "ds_id") for p in model.parameters()) and not (window and width > window)


def last_logits(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int, keep: int) -> torch.Tensor:
    """The logits of the last `keep` columns of each prompt followed by its continuation, the
    sequences ending at the last column (left padding); what all prompts open with is computed once
    where `checks_share_prefix` allows."""
    sequences = [p + c for p, c in zip(prompts, continuations)]
    if not checks_share_prefix(model, max(map(len, sequences))):
        return model(**to_device(pad_batch(sequences, pad_id, side="left"), model.device), logits_to_keep=keep).logits
    batch = to_device(padded_after_prefix(sequences, pad_id, common_prefix_length(prompts)), model.device)
    return logits_sharing_prefix(model, **batch, logits_to_keep=keep)
