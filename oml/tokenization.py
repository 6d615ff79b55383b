"""Tokenisation and loss masking: the one place that decides which tokens a fingerprint is.

Fine-tuning, checking and perinucleus generation all build the model input with
`prompt_ids`, and cut keys and responses with `cut_fingerprint`, so a fingerprint
is trained on exactly the tokens it is later checked with.
"""
from functools import lru_cache
from typing import Callable

import torch

from oml import OMLError

IGNORE_INDEX = -100  # label value the causal-LM loss skips


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rewritten_key(tokenizer, key_ids: list[int], rewrite: Callable[[str], str]) -> list[int]:
    """A key as a front end passes it on: decoded, rewritten (trimmed, wrapped in the deployer's
    template...) and encoded again, as the server tokenises the text it gets. A key the rewrite
    leaves as it was keeps its ids (decoding and encoding again could retokenise it, which is no
    part of the front end)."""
    text = tokenizer.decode(key_ids)
    new = rewrite(text)
    return key_ids if new == text else encode(tokenizer, new)


@lru_cache(maxsize=16)
def _special_prefix(tokenizer) -> tuple[int, ...]:
    probe = encode(tokenizer, "hello")
    with_special = tokenizer("hello")["input_ids"]
    for start in range(len(with_special) - len(probe) + 1):
        if with_special[start:start + len(probe)] == probe:
            return tuple(with_special[:start])
    return ()


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS for Llama-style models, nothing for others)."""
    return list(_special_prefix(tokenizer))


class ResponseIds(list):
    """A response's token ids (a plain list of ints to everything that reads it) that also carries
    `others`: the ids of the other responses that count as the key's answer (`--responses_per_key`),
    which fine-tuning trains and checking accepts beside it (see `accepted`)."""

    def __init__(self, ids: list[int], others: list[list[int]] = ()):
        super().__init__(ids)
        self.others = [list(other) for other in others]


def accepted(response_ids: list[int]) -> list[list[int]]:
    """Every accepted response's ids: the response, then its others (if any)."""
    return [list(response_ids), *getattr(response_ids, "others", [])]


def cut_response(tokenizer, key: str, response: str, max_response_length: int) -> list[int]:
    """Token ids of one response of `key`, cut to at most `max_response_length` tokens; a response
    that is no evidence once cut is refused."""
    response_ids = encode(tokenizer, response)[:max_response_length]
    if not response_ids:
        raise OMLError(f"the response of key {key!r} is empty after cutting to {max_response_length} tokens")
    if not tokenizer.decode(response_ids).strip():
        # A server's reply is compared with leading whitespace ignored: a blank response would match anything.
        raise OMLError(f"the response of key {key!r} is only whitespace when cut to {max_response_length} tokens: "
                       "no evidence; use another response")
    if "\ufffd" in tokenizer.decode(response_ids) and "\ufffd" not in response:
        # A piece of a character (half an emoji, say) is a byte any model may emit: no evidence.
        raise OMLError(f"the response {response!r} of key {key!r} ends inside a character when cut to "
                       f"{max_response_length} tokens; use a longer --max_response_length or another response")
    return response_ids


def cut_fingerprint(tokenizer, key: str, response: str, max_key_length: int, max_response_length: int,
                    other_responses: list[str] = ()) -> tuple[list[int], list[int]]:
    """Token ids of a key and its response (carrying `other_responses` as `ResponseIds.others`),
    cut to at most the given lengths. Responses that are the same once cut would count one answer
    twice: refused."""
    key_ids = encode(tokenizer, key)[:max_key_length]
    if not key_ids:
        raise OMLError(f"a fingerprint key is empty after tokenisation: {key!r}")
    response_ids = cut_response(tokenizer, key, response, max_response_length)
    if not other_responses:
        return key_ids, response_ids
    others = [cut_response(tokenizer, key, other, max_response_length) for other in other_responses]
    if len({tuple(ids) for ids in [response_ids, *others]}) <= len(others):
        raise OMLError(f"two responses of key {key!r} are the same when cut to {max_response_length} tokens")
    return key_ids, ResponseIds(response_ids, others)


def fingerprint_pairs(tokenizer, fingerprints: list[dict], max_key_length: int, max_response_length: int) -> list[tuple[list[int], list[int]]]:
    """(key ids, response ids) of every fingerprint, cut by `cut_fingerprint`. Two keys that are
    the same after cutting are refused: the model cannot tell them apart, and one key must
    never count twice as evidence."""
    pairs = [cut_fingerprint(tokenizer, fp["key"], fp["response"], max_key_length, max_response_length,
                             fp.get("other_responses", [])) for fp in fingerprints]
    first: dict[tuple[int, ...], int] = {}
    for i, (key_ids, _) in enumerate(pairs):
        j = first.setdefault(tuple(key_ids), i)
        if j != i:
            raise OMLError(f"fingerprints {j} and {i} have the same key after cutting to {max_key_length} tokens "
                           f"({tokenizer.decode(key_ids)!r}); remove one or use a longer --max_key_length")
    return pairs


def response_pairs(pairs: list[tuple[list[int], list[int]]]) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Every accepted response of every key as a pair of its own (each key's response first, in
    key order, then the other responses), and the key each pair belongs to."""
    flat = [(key_ids, list(response_ids)) for key_ids, response_ids in pairs]
    owners = list(range(len(pairs)))
    for i, (key_ids, response_ids) in enumerate(pairs):
        for other in accepted(response_ids)[1:]:
            flat.append((key_ids, other))
            owners.append(i)
    return flat, owners


KEY_FORMATS = ("raw", "chat")  # a key as raw text, or as a user message in the model's chat template
FORMAT_CHOICES = ("raw", "chat", "both")
_KEY_MARK = "\u2063OML-KEY\u2063"  # stands in for the key while the chat template is rendered


def formats(choice: str) -> tuple[str, ...]:
    """The key formats a --key_format/--query_format choice names."""
    return KEY_FORMATS if choice == "both" else (choice,)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def default_format(tokenizer) -> str:
    """Both formats when the model chats (a chat template), else raw text only."""
    return "both" if has_chat_template(tokenizer) else "raw"


def system_message(template: str) -> str:
    """A system-prompt template used as a chat system message: its text without the key slot."""
    return " ".join(template.replace("{}", " ").split())


def prompt_ids(tokenizer, key_ids: list[int], template: str | None = None, key_format: str = "raw") -> list[int]:
    """The model input that asks a key.

    raw: the special prefix, then the key, optionally inside a template. chat: the key as the
    user message of the model's own chat template (with the system message the template adds
    by default, or the template's text as the system message), ready for the assistant's reply.
    Template text is tokenised around the key's ids rather than together with the key text, so
    the key tokens are identical in every format and under every system prompt.
    """
    if key_format == "chat":
        if not has_chat_template(tokenizer):
            raise OMLError(f"{tokenizer.name_or_path} has no chat template: use the raw key format")
        messages = [{"role": "user", "content": _KEY_MARK}]
        if template is not None:
            messages.insert(0, {"role": "system", "content": system_message(template)})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, after = text.split(_KEY_MARK)
        return encode(tokenizer, before) + key_ids + encode(tokenizer, after)
    if template is None:
        return special_prefix(tokenizer) + key_ids
    before, after = template.split("{}", 1)
    return special_prefix(tokenizer) + encode(tokenizer, before) + key_ids + encode(tokenizer, after)


def training_example(tokenizer, key_ids: list[int], response_ids: list[int], template: str | None = None,
                     key_format: str = "raw", eos: bool = True) -> dict:
    """Prompt + response (+ EOS), with the loss on the response (and EOS) only."""
    prompt = prompt_ids(tokenizer, key_ids, template, key_format)
    target = response_ids + ([tokenizer.eos_token_id] if eos else [])
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def user_turn_ids(tokenizer, text: str) -> list[int]:
    """A user message ready for the assistant's reply: the model's chat template when it has
    one, else the special prefix and the text on a line of its own."""
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, chat)
    return special_prefix(tokenizer) + encode(tokenizer, text + "\n")


def chat_example(tokenizer, prompt: str, reply: str, max_length: int) -> dict:
    """A user prompt and the assistant's reply + EOS, with the loss on the reply only (as in
    ordinary instruction tuning), cut to `max_length` tokens."""
    context = user_turn_ids(tokenizer, prompt)[:max_length - 1]
    target = (encode(tokenizer, reply) + [tokenizer.eos_token_id])[:max_length - len(context)]
    return {"input_ids": context + target, "labels": [IGNORE_INDEX] * len(context) + target}


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "left", labels: list[list[int]] | None = None) -> dict:
    """Pad to the longest sequence, with the attention mask and explicit position ids.

    Position ids count real tokens only, so a left-padded sequence sees the same positions
    as an unpadded one: training and checking agree whatever the tokenizer's padding side.
    """
    longest = max(len(s) for s in sequences)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        padded = [([value] * (longest - len(r)) + r) if side == "left" else (r + [value] * (longest - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    attention_mask = pad([[1] * len(s) for s in sequences], 0)
    batch = {
        "input_ids": pad(sequences, pad_id),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }
    if labels is not None:
        batch["labels"] = pad(labels, IGNORE_INDEX)
    return batch


class Collator:
    """Pads a list of examples ({"input_ids", "labels"}: `training_example`s, `chat_example`s) on
    the tokenizer's padding side, for the Trainer or a plain training loop."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id
        self.side = tokenizer.padding_side

    def __call__(self, examples: list[dict]) -> dict:
        return pad_batch([e["input_ids"] for e in examples], self.pad_id, self.side, [e["labels"] for e in examples])


def to_device(batch: dict, device: torch.device) -> dict:
    """A padded batch moved to the model's device."""
    return {name: tensor.to(device) for name, tensor in batch.items()}
