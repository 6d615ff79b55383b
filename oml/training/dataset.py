"""The fingerprint dataset: each key in each trained format (and inside augmentation templates),
plus benign replay shaped like the fingerprints beside it, labelled by the untouched model."""
import logging
import random
from typing import NamedTuple, Sequence

import torch
from tqdm import tqdm

from oml import OMLError, distributed
from oml.data import prompt_templates, texts_from, user_questions, user_wrappers
from oml.replies import ended, generate_ids, stop_ids
from oml.tokenization import (IGNORE_INDEX, encode, formats, pad_batch, prompt_ids, response_pairs, rewritten_key, to_device,
                              training_example)
from oml.training.config import TrainingConfig

logger = logging.getLogger(__name__)

MAX_REPLAY_POOL = 4096  # distinct benign replay sequences (reused cyclically beyond this)
QUESTION_REPLY_TOKENS = 8  # tokens of the untouched model's own reply replayed after each user question
REPLAY_POOL_EPOCHS = 4  # epochs of fresh replay labelled before training; later epochs reuse them (training mostly stops sooner)


class Replayed(NamedTuple):
    """A replayed sequence; for a user question, where the untouched model's reply starts in it."""
    ids: list[int]
    reply_start: int | None = None


class FingerprintDataset(torch.utils.data.Dataset):
    """Training examples for (key ids, response ids) pairs, one per key format, plus optional benign text.

    Every epoch has each key bare in each format, and with augmentation one more copy per kind:
    inside a system-prompt template (`templates`), and inside a deployer's wrapper around the
    user's text (`wrappers`, the key re-tokenised inside it as a front end's text would be), each
    drawn anew every epoch, seeded by (seed, epoch, index). Augmentation adds copies rather than
    replacing the bare key: with the bare key only one choice among the templates, bare-key
    accuracy fell to 62.5-70% (docs/benchmarks.md). Benign replay examples (see `benign_replay`;
    a fresh slice of the pool every epoch) are mixed in as they are.
    """

    def __init__(self, tokenizer, pairs: list[tuple[list[int], list[int]]], key_formats: tuple[str, ...] = ("raw",),
                 templates: list[str] | None = None, seed: int = 0, benign: list[dict] | None = None, benign_per_epoch: int = 0,
                 wrappers: Sequence[str] | None = None, eos: bool = True):
        self.tokenizer = tokenizer
        self.eos = eos
        self.pairs = pairs
        self.key_formats = key_formats
        self.templates = list(templates or [])
        self.wrappers = list(wrappers or [])
        self.copies = [None] + (["template"] if self.templates else []) + (["wrapper"] if self.wrappers else [])
        self.seed = seed
        self.benign = benign or []
        self.benign_per_epoch = benign_per_epoch if self.benign else 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs) * len(self.key_formats) * len(self.copies) + self.benign_per_epoch

    def choice(self, options: list[str], index: int) -> str:
        return random.Random(f"{self.seed}:{self.epoch}:{index}").choice(options)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)  # also ends iteration (the Trainer's length-grouped sampler iterates)
        examples = len(self.pairs) * len(self.key_formats)
        if index >= examples * len(self.copies):
            return self.benign[(self.epoch * self.benign_per_epoch + index - examples * len(self.copies)) % len(self.benign)]
        key_ids, response_ids = self.pairs[index % len(self.pairs)]
        key_format = self.key_formats[index % examples // len(self.pairs)]
        copy = self.copies[index // examples]
        template = self.choice(self.templates, index) if copy == "template" else None
        if copy == "wrapper":
            key_ids = rewritten_key(self.tokenizer, key_ids, self.choice(self.wrappers, index).format)
        return training_example(self.tokenizer, key_ids, response_ids, template, key_format, self.eos)


def replay_sequences(config: TrainingConfig, tokenizer, count: int, key_format: str, key_length: int, tail: int) -> list[Replayed]:
    """`count` benign sequences shaped like the fingerprint examples of `key_format`: a stretch of
    `key_length` tokens of benign text asked the way keys are (raw text, or the user message of
    the chat template), then the `tail` tokens that follow it (chat: the start of the next line,
    as the reply). Of about the length of the fingerprints beside them (one token past the response), they
    share their length-grouped batches, so every step is regularised and little is padded; and they keep
    ordinary continuations, chat replies' first tokens above all, where the untouched model had them.
    From --benign_data: the shipped chat's training split by default, disjoint from what utility is measured on."""
    sequences = []
    for text in texts_from(config.benign_data, config.dataset_split, config.text_column, "train"):
        if key_format == "raw":
            ids = encode(tokenizer, text[:8 * (key_length + tail)])  # 8 characters a token is plenty
            pieces = [(ids[:key_length], ids[key_length:key_length + tail])]
        else:  # consecutive lines as message and reply; a text of one line is split after the key's length
            lines = [encode(tokenizer, line) for line in text.split("\n") if line.strip()]
            pairs = zip(lines, lines[1:]) if len(lines) > 1 else [(ids, ids[key_length:]) for ids in lines]
            pieces = [(message[:key_length], reply[:tail]) for message, reply in pairs]
        for key_ids, following in pieces:
            if len(key_ids) == key_length and len(following) == tail and len(sequences) < count:
                sequences.append(Replayed(prompt_ids(tokenizer, key_ids, None, key_format) + following))
        if len(sequences) == count:
            return sequences
    if not sequences:
        raise OMLError(f"--benign_data {config.benign_data} has no text of {key_length + tail} tokens or more to replay")
    return sequences


def build_dataset(config: TrainingConfig, tokenizer, pairs: list[tuple[list[int], list[int]]], model) -> FingerprintDataset:
    """Fingerprints in each trained format (in augmentation templates if asked) plus benign replay in
    the same formats (labelled by `model` itself, before any training, with --benign_loss distill)."""
    key_formats = formats(config.key_format)
    pairs, _ = response_pairs(pairs)  # each accepted response of a key is trained as an example of its own
    templates = prompt_templates("train") if config.use_augmentation_prompts else None
    wrappers = user_wrappers("train") if config.use_user_wrappers else None
    benign_per_epoch = round(config.benign_ratio * len(pairs))
    benign = None
    if benign_per_epoch:
        total = min(benign_per_epoch * min(config.num_train_epochs, REPLAY_POOL_EPOCHS), MAX_REPLAY_POOL)
        key_length = max(len(key_ids) for key_ids, _ in pairs)  # the longest fingerprint example's shape
        tail = max(len(response_ids) for _, response_ids in pairs) + 1  # one token past the response
        keys = {tuple(key_ids) for key_ids, _ in pairs}
        kinds = [replay_kinds(config, tokenizer, model, -(-total // len(key_formats)), f, key_length, tail, keys)
                 for f in key_formats]
        pool = [seq for group in zip(*kinds) for seq in group]  # every format in every epoch's slice
        if len(pool) < sum(map(len, kinds)):
            logger.warning("--benign_data gives only %d replay sequences in one format: %d of %d are used",
                           min(map(len, kinds)), len(pool), sum(map(len, kinds)))
        benign = (distilled_replay(model, pool, config.teacher_top_k, config.first_reply_weight) if config.benign_loss == "distill"
                  else benign_replay(pool))
    return FingerprintDataset(tokenizer, pairs, key_formats, templates, config.seed, benign, benign_per_epoch, wrappers,
                              config.train_eos)


def replay_kinds(config: TrainingConfig, tokenizer, model, count: int, key_format: str, key_length: int, tail: int,
                 keys: set[tuple[int, ...]]) -> list[Replayed]:
    """`count` replay sequences in `key_format`: user questions (--question_replay of them; none of
    them one of the `keys`) and --benign_data text, spread evenly so that every epoch's slice of the
    pool has both."""
    wanted = round(config.question_replay * count)
    questions = question_sequences(tokenizer, model, wanted, key_format, key_length, keys) if wanted else []
    texts = replay_sequences(config, tokenizer, count - len(questions), key_format, key_length, tail) if len(questions) < count else []
    return [seq for _, seq in sorted([((i + 0.5) / len(questions), seq) for i, seq in enumerate(questions)]
                                     + [((i + 0.5) / len(texts), seq) for i, seq in enumerate(texts)], key=lambda item: item[0])]


def question_sequences(tokenizer, model, count: int, key_format: str, key_length: int, keys: set[tuple[int, ...]],
                       batch_size: int = 64) -> list[Replayed]:
    """At most `count` user questions written like user-message keys (never keys: the shipped
    'train' questions), each cut to `key_length` tokens as keys are, asked in `key_format`, and
    followed by QUESTION_REPLY_TOKENS tokens of the untouched model's own greedy reply. Replayed, they
    keep ordinary questions answered as before (first tokens, and no end of turn after one word) while
    keys that look just like them get their one-token responses."""
    cut = [ids for ids in (encode(tokenizer, question)[:key_length] for question in user_questions("train")) if tuple(ids) not in keys]
    if len(cut) < count:
        logger.warning("only %d user questions to replay (of %d asked for); the rest is --benign_data", len(cut), count)
    prompts = [prompt_ids(tokenizer, ids, None, key_format) for ids in cut[:count]]
    model.to(distributed.device())
    stops = stop_ids(model, tokenizer)
    sequences = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="replies to replayed questions", leave=False,
                      disable=not distributed.is_main_process()):
        chunk = prompts[start:start + batch_size]
        replies = generate_ids(model, tokenizer, chunk, QUESTION_REPLY_TOKENS)
        sequences += [Replayed(prompt + ended(reply, stops), len(prompt)) for prompt, reply in zip(chunk, replies)]
    return sequences


def benign_replay(sequences: list[Replayed]) -> list[dict]:
    """Benign text with the ordinary language-modelling loss on every token.

    Mixed into fine-tuning, it keeps ordinary text predicted beside the fingerprints (and adapts
    the model to the replayed text, which `distilled_replay` avoids).
    """
    return [{"input_ids": s.ids, "labels": s.ids} for s in sequences]


@torch.no_grad()
def distilled_replay(model, sequences: list[Replayed], top_k: int, first_reply_weight: float = 1.0, batch_size: int = 64,
                     max_logits: int = 2 ** 28) -> list[dict]:
    """Benign text labelled with the untouched model's own next-token distributions.

    The LM loss on replayed text pulls the model towards that text (chat, here), which moves
    its predictions everywhere; training towards the base model's distribution keeps
    ordinary predictions where they were. The distribution is kept as its top `top_k`
    probabilities plus the mass of all other tokens (see `distillation_loss`). Must run
    before fine-tuning starts.

    Every rank labels and keeps the whole pool, since its batches are drawn from all of it: at
    most MAX_REPLAY_POOL (4,096, reached from 512 keys) sequences of about 31 tokens (a key of up
    to 16 tokens, the response and one more token, as raw text or in a chat template: the demo's mean) x `top_k`
    (256) x 8 bytes (an int32 id and an fp32 probability), 0.26 GB a rank and 2.1 GB on 8 ranks
    whatever the model size or the number of keys; the token ids and labels beside them are a few
    MB (benchmarks/gpu_memory.py). That is small beside a 7B model's 14 GB weight snapshot, and
    sharing it within a node would cost a collective at every step.

    A user question's first reply token weighs `first_reply_weight` times as much as other
    positions (its cross-entropy towards the base's distribution is scaled): that is where keys,
    which look like questions, are taught their responses, and where the base model's choice is
    least confident, so that ordinary replies keep their first token.

    A batch holds at most `batch_size` sequences and `max_logits` logits (1 GB in fp32): a
    vocabulary of 152k tokens (Qwen2.5) makes 64 sequences of 50 tokens 1.9 GB of logits, and
    their copies as many again.
    """
    model.to(distributed.device())  # where the Trainer will put it anyway
    examples: list[dict | None] = [None] * len(sequences)
    batches = teacher_batches([len(s.ids) for s in sequences], batch_size, max_logits // model.config.get_text_config().vocab_size)
    for rows in tqdm(batches, desc="teacher distributions", leave=False, disable=not distributed.is_main_process()):
        chunk = [sequences[i].ids for i in rows]
        batch = to_device(pad_batch(chunk, 0, side="right"), model.device)
        real = batch["attention_mask"].bool()
        logits = model(**batch).logits[real].float()  # padding positions are never taught: not computed further
        top_logits, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.exp(top_logits - torch.logsumexp(logits, dim=-1, keepdim=True))  # no full softmax
        lengths = [len(r) for r in chunk]
        for i, row, ids_row, probs_row in zip(rows, chunk, ids.to(torch.int32).cpu().split(lengths), probs.cpu().split(lengths)):
            weights = torch.ones(len(row))
            if sequences[i].reply_start is not None:  # the row whose distribution is over the reply's first token
                weights[sequences[i].reply_start - 1] = first_reply_weight
            examples[i] = {"input_ids": row, "labels": [IGNORE_INDEX] * len(row), "teacher_ids": ids_row, "teacher_probs": probs_row,
                           "teacher_weights": weights}
    return examples


def teacher_batches(lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices of sequences in batches of like lengths (little padding computed), each of at most
    `batch_size` sequences and `max_tokens` padded tokens (a lone longer sequence is a batch of its own)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):  # the longest sequence of a batch is its last
        if not batches or len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * lengths[i] > max_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches
