"""Generated replies: the one place that runs `generate()`, and the utility measure built on it.

Teacher-forced measures (perplexity, KL) score the tokens they are given; they cannot see a
model that has learnt to end its turn after one word. The reply measure asks held-out prompts
shaped like an assistant's traffic and compares what a model generates with what its base does.
"""
import zlib
from dataclasses import dataclass
from statistics import fmean as mean

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from oml import OMLError
from oml.data import assistant_prompts
from oml.files import read_json
from oml.settings import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Settings, setting
from oml.tokenization import has_chat_template, pad_batch, to_device, user_turn_ids

SHORT_REPLY_TOKENS = 3  # a reply of at most this many tokens does not answer an assistant's question
COMPARED_TOKENS = 16  # replies count as the base's own when their first this many tokens are the base's


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None,
                 logits_processors: list[LogitsProcessor] = ()) -> list[list[int]]:
    """One generate() call over a left-padded batch: each prompt's `max_new_tokens` next tokens (a
    sequence that ended is padded on). Greedy without a `temperature`; with one, plain sampling from
    the global torch seed (no top-k or top-p: what OpenAI-compatible servers do by default).
    `logits_processors` see every step's scores."""
    batch = pad_batch(prompts, tokenizer.pad_token_id, side="left")
    del batch["position_ids"]  # generate() derives them from the attention mask
    batch = to_device(batch, model.device)
    if temperature:
        decoding = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        decoding = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    output = model.generate(**batch, **decoding, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            logits_processor=LogitsProcessorList(logits_processors))
    return output[:, batch["input_ids"].shape[1]:].tolist()


@dataclass(frozen=True)
class ReplySettings(Settings):
    """The reply measure: does the model still answer ordinary prompts as its base does?"""
    num_reply_prompts: int = setting(
        240, "Held-out prompts asked through the chat template, a third of each kind: user questions written like "
             "user-message keys (never trained), chitchat first turns, MMLU questions asked openly (0: skip the measure).",
        NON_NEGATIVE_INT)
    reply_prompts: str | None = setting(
        None, "A JSON file with a list of your own prompts to ask instead (e.g. your users' traffic).", kind=str)
    max_reply_tokens: int = setting(
        64, "Tokens generated per reply at most (far past the few tokens of a reply that stops at once).", POSITIVE_INT)
    reply_temperature: float = setting(0.7, "Temperature of the sampled replies (beside the greedy ones).", POSITIVE_FLOAT)
    reply_seed: int = setting(0, "Seed of the sampled replies.", kind=int)
    reply_batch_size: int = setting(64, "Prompts per generate() call.", POSITIVE_INT)


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end a reply: the tokenizer's end of sequence and the model's own stop tokens."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return {i for i in [tokenizer.eos_token_id, *configured] if i is not None}


def replies(model, tokenizer, prompts: list[list[int]], settings: ReplySettings, temperature: float | None,
            stops: set[int], desc: str, logits_processors: list[LogitsProcessor] = ()) -> list[list[int]]:
    """Each prompt's reply, `ended` (its stop token kept, so that a reply that ended is told from one
    cut at --max_reply_tokens). Prompts are batched by length (little padding computed); sampling
    is seeded per batch, so that every model asked the same prompts draws from the same seeds.
    `logits_processors` change every step's scores (e.g. a watermark, oml.watermark)."""
    size = settings.reply_batch_size
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # like lengths together: little padding computed
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(prompts), size), desc=desc, leave=False):
        if temperature:
            torch.manual_seed(zlib.crc32(f"{settings.reply_seed}:{start}".encode()))
        rows = order[start:start + size]
        for i, row in zip(rows, generate_ids(model, tokenizer, [prompts[i] for i in rows], settings.max_reply_tokens, temperature,
                                                  logits_processors)):
            outputs[i] = ended(row, stops)
    return outputs


def ended(row: list[int], stops: set[int]) -> list[int]:
    """A generated row cut after its first stop token (generate() pads a sequence that ended)."""
    end = next((i for i, token in enumerate(row) if token in stops), len(row) - 1)
    return row[:end + 1]


def reply_length(reply: list[int], stops: set[int]) -> int:
    """Tokens of a reply before its stop token."""
    return len(reply) - bool(reply and reply[-1] in stops)


def prompt_texts(settings: ReplySettings, exclude: set[str]) -> tuple[list[str], list[str]]:
    """The prompts the measure asks (at most --num_reply_prompts, none of them in `exclude`) and their kinds."""
    if settings.reply_prompts is None:
        texts, kinds = assistant_prompts(settings.num_reply_prompts, exclude)
    else:
        given = read_json(settings.reply_prompts, "--reply_prompts file")
        if not isinstance(given, list) or not all(isinstance(text, str) for text in given):
            raise OMLError(f"--reply_prompts {settings.reply_prompts} must hold a JSON list of strings")
        texts = [text for text in given if text.strip() and text.strip() not in exclude][:settings.num_reply_prompts]
        kinds = ["given prompts"] * len(texts)
    if not texts:
        raise OMLError("no prompts for the reply measure" + (f" in {settings.reply_prompts}" if settings.reply_prompts else ""))
    return texts, kinds


def fingerprint_keys(fingerprints: list[dict]) -> set[str]:
    """The keys of fingerprint records, as the reply measure leaves them out of its prompts."""
    return {record["key"].strip() for record in fingerprints}


class ReplyMeasure:
    """The reply measure against one base model: its held-out prompts (none of them one of
    `exclude`, a run's keys) are chosen and checked when it is made, before any slow work; the
    base's greedy and sampled replies are made once, when first needed, and any number of models
    are compared with them (`compare`). Every reply is cut and counted with the base's stop tokens."""

    def __init__(self, base, tokenizer, settings: ReplySettings, exclude: set[str] = frozenset()):
        if not has_chat_template(tokenizer):
            raise OMLError(f"{tokenizer.name_or_path} has no chat template, which the reply measure asks its prompts "
                           "through (--num_reply_prompts 0 skips the measure)")
        texts, self.kinds = prompt_texts(settings, exclude)
        self.base_model, self.tokenizer, self.settings = base, tokenizer, settings
        self.prompts = [user_turn_ids(tokenizer, text) for text in texts]
        self.stops = stop_ids(base, tokenizer)
        self._base_replies: dict[str, list[list[int]]] | None = None

    @property
    def base(self) -> dict[str, list[list[int]]]:
        """The base's greedy and sampled replies (made on first use)."""
        if self._base_replies is None:
            self._base_replies = self.replies(self.base_model, "base")
        return self._base_replies

    def replies(self, model, name: str) -> dict[str, list[list[int]]]:
        return {"greedy": replies(model, self.tokenizer, self.prompts, self.settings, None, self.stops, f"{name}: greedy replies"),
                "sampled": replies(model, self.tokenizer, self.prompts, self.settings, self.settings.reply_temperature,
                                   self.stops, f"{name}: sampled replies")}

    def compare(self, model, name: str = "model") -> dict:
        """How `model`'s replies compare with the base's, greedy and sampled: the share of short
        replies (at most SHORT_REPLY_TOKENS tokens; per prompt kind too, greedy) beside the base's, the
        mean length against the base's, and, greedy only, how often the first token and the first
        COMPARED_TOKENS tokens (the stop token included) are the base's."""
        mine = self.replies(model, name)
        report = {"num_prompts": len(self.prompts), "max_reply_tokens": self.settings.max_reply_tokens,
                  "temperature": self.settings.reply_temperature}
        for decoding in ("greedy", "sampled"):
            lengths = [reply_length(r, self.stops) for r in mine[decoding]]
            base_lengths = [reply_length(r, self.stops) for r in self.base[decoding]]
            part = {"short_reply_share": mean([n <= SHORT_REPLY_TOKENS for n in lengths]),
                    "base_short_reply_share": mean([n <= SHORT_REPLY_TOKENS for n in base_lengths]),
                    "mean_length": mean(lengths), "base_mean_length": mean(base_lengths),
                    "relative_length": sum(lengths) / max(sum(base_lengths), 1)}
            if decoding == "greedy":
                pairs = list(zip(mine[decoding], self.base[decoding]))
                part["first_token_agreement"] = mean([r[:1] == b[:1] for r, b in pairs])
                part["prefix_agreement"] = mean([r[:COMPARED_TOKENS] == b[:COMPARED_TOKENS] for r, b in pairs])
                part["short_reply_share_by_kind"] = {
                    kind: {who: mean([n <= SHORT_REPLY_TOKENS for n, k in zip(counted, self.kinds) if k == kind])
                           for who, counted in (("base", base_lengths), ("model", lengths))}
                    for kind in dict.fromkeys(self.kinds)}
            report[decoding] = part
        return report


def print_reply_rows(report: dict) -> None:
    """The reply measure as rows of evaluate_utility.py's table (base, model)."""
    greedy, sampled = report["greedy"], report["sampled"]
    rows = [(f"replies of <= {SHORT_REPLY_TOKENS} tokens, greedy", greedy["base_short_reply_share"], greedy["short_reply_share"])]
    rows += [(f"  {kind}", shares["base"], shares["model"]) for kind, shares in greedy["short_reply_share_by_kind"].items()]
    rows += [(f"replies of <= {SHORT_REPLY_TOKENS} tokens, T={report['temperature']:g}", sampled["base_short_reply_share"],
              sampled["short_reply_share"]),
             ("mean reply length (tokens), greedy", greedy["base_mean_length"], greedy["mean_length"]),
             (f"mean reply length (tokens), T={report['temperature']:g}", sampled["base_mean_length"], sampled["mean_length"]),
             ("first reply token = base's, greedy", None, greedy["first_token_agreement"]),
             (f"first {COMPARED_TOKENS} reply tokens = base's, greedy", None, greedy["prefix_agreement"])]
    for name, base, value in rows:
        print(f"{name:<48} {'' if base is None else f'{base:.4f}':>10} {value:>10.4f}")
