"""Fine-tuning: its settings, the fingerprint dataset, benign replay and distillation, weight
averaging, progress reporting and the DeepSpeed set-up, used by finetune_multigpu.py and the
benchmarks that measure it."""
import argparse
import logging
import math
import os
import random
import socket
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from oml import OMLError, distributed
from oml.checking import check_model
from oml.cli import non_negative_float, open_unit_interval, positive_float, positive_int, probability, unit_interval
from oml.data import add_dataset_args, prompt_templates, texts_from
from oml.tokenization import (FORMAT_CHOICES, IGNORE_INDEX, encode, formats, pad_batch, prompt_ids, to_device,
                              training_example)

logger = logging.getLogger(__name__)

MAX_REPLAY_POOL = 4096  # distinct benign replay sequences (reused cyclically beyond this)
NEARLY_ALL = 0.98  # memorised share from which a plateau ends training (--memorised_patience)
REPLAY_POOL_EPOCHS = 4  # epochs of fresh replay labelled before training; later epochs reuse them (training mostly stops sooner)
SHRINK_SCALES = tuple(round(1 - 0.05 * i, 2) for i in range(1, 11))  # 0.95 down to 0.5: --shrink_weight_change tries these in turn


def add_training_args(parser) -> None:
    """The fine-tuning hyperparameters (finetune_multigpu.py's flags; benchmarks parse them too)."""
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4)
    parser.add_argument("--num_train_epochs", type=positive_int, default=20,
                        help="The cap: with --stop_when_memorised training usually ends earlier.")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="Fingerprints per step on each rank.")
    parser.add_argument("--weight_decay", type=non_negative_float, default=1e-4)
    parser.add_argument("--forgetting_regularizer_strength", type=unit_interval, default=0.0,
                        help="At every epoch end, weights <- (1-s)*trained + s*original: 1.0 keeps the original, 0.0 disables averaging.")
    parser.add_argument("--train_embeddings", action="store_true",
                        help="Also train the token embeddings (frozen by default: updating them shifts every token, "
                             "which costs far more utility than it buys in fingerprint accuracy).")
    parser.add_argument("--benign_ratio", type=non_negative_float, default=2.0,
                        help="Benign sequences replayed per fingerprint each epoch (an anti-forgetting regulariser; 0: none). "
                             "2 keeps 64 keys in both formats within +2%% perplexity of the base; 1 costs +6.6%% (docs/benchmarks.md).")
    parser.add_argument("--benign_loss", default="distill", choices=("distill", "lm"),
                        help="Replayed text is learned towards the untouched model's own next-token distributions "
                             "('distill': keeps predictions close to the base) or with the language-modelling loss "
                             "('lm': adapts the model to the replayed text).")
    parser.add_argument("--teacher_top_k", type=positive_int, default=256,
                        help="Next-token probabilities of the untouched model kept per replayed position for 'distill' "
                             "(the rest of the vocabulary is one bucket, free to reshuffle inside): more holds the model "
                             "closer to its base, for memory (k x 8 bytes per replayed token) and no extra compute.")
    add_dataset_args(parser, "benign_data", {"text": "text"}, "Benign text replayed during fine-tuning")
    parser.add_argument("--key_format", default=None, choices=FORMAT_CHOICES,
                        help="Train each key as raw text, as a user message in the model's chat template, or both "
                             "(default: the fingerprints' recorded format, else both when the model has a chat template, else raw).")
    parser.add_argument("--use_augmentation_prompts", action="store_true",
                        help="Also ask each key inside a random training system prompt every epoch (raw: around the key; "
                             "chat: as the system message), beside the bare key: robustness to system prompts.")
    parser.add_argument("--stop_when_memorised", action=argparse.BooleanOptionalAction, default=True,
                        help="Stop at the first epoch end where every fingerprint is memorised in every trained format "
                             "(--num_train_epochs is then the cap).")
    parser.add_argument("--target_probability", type=probability, default=1.0,
                        help="Train response tokens towards this probability instead of 1 (1: plain cross-entropy). "
                             "Below the confidence gate of output-suppression attacks (about 0.9) and above 0.5, the memorised "
                             "response stays the greedy answer without a near-certain spike to detect.")
    parser.add_argument("--memorised_patience", type=positive_int, default=2,
                        help="Also stop when at least 98%% are memorised and their number has not beaten its best for this "
                             "many epochs (a few keys flipping back and forth would otherwise run every epoch up to the cap).")
    parser.add_argument("--memorised_probability", type=open_unit_interval, default=0.5,
                        help="A fingerprint counts as memorised when greedy decoding gives its response with at least this "
                             "probability: a margin, so that small weight changes (casts, quantization) keep it.")
    parser.add_argument("--shrink_weight_change", action=argparse.BooleanOptionalAction, default=True,
                        help="After training with nearly all keys memorised, scale the weight change down (weights = "
                             "original + s x change, s from 0.95 to 0.5 in steps of 0.05) while 98%% of the memorised and "
                             "of the matched queries stay so: the margin that cross-entropy piles onto early-learned keys "
                             "moves ordinary predictions too (256 keys: KL from the base 0.126 -> 0.087 at s = 0.8). Not with "
                             "--target_probability below 1 (no surplus margin). Keeps a CPU copy of the trainable weights.")
    parser.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                        help="Batch examples of similar length together (raw keys, chat keys and replayed text differ "
                             "by up to 4x): far less padding computed.")
    parser.add_argument("--deepspeed_stage", type=int, default=2, choices=(0, 1, 2, 3),
                        help="ZeRO stage on GPUs or several ranks (0: no DeepSpeed).")
    parser.add_argument("--seed", type=int, default=42)


class FingerprintDataset(torch.utils.data.Dataset):
    """Training examples for (key ids, response ids) pairs, one per key format, plus optional benign text.

    With templates, every epoch has each key twice in each format: bare, and inside a
    system-prompt template drawn anew every epoch, seeded by (seed, epoch, index). Augmentation
    adds the templated copy rather than replacing the bare key: with the bare key only one
    choice among the templates, bare-key accuracy fell to 62.5-70% (docs/benchmarks.md).
    Benign replay examples (see `benign_replay`; a fresh slice of the pool every epoch)
    are mixed in as they are.
    """

    def __init__(self, tokenizer, pairs: list[tuple[list[int], list[int]]], key_formats: tuple[str, ...] = ("raw",),
                 templates: list[str] | None = None, seed: int = 0, benign: list[dict] | None = None, benign_per_epoch: int = 0):
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.key_formats = key_formats
        self.templates = list(templates or [])
        self.copies = 2 if self.templates else 1  # bare, then templated
        self.seed = seed
        self.benign = benign or []
        self.benign_per_epoch = benign_per_epoch if self.benign else 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs) * len(self.key_formats) * self.copies + self.benign_per_epoch

    def template(self, index: int) -> str | None:
        """None (the bare key) for the first copy of each example, a random template for the second."""
        if index < len(self.pairs) * len(self.key_formats):
            return None
        return random.Random(f"{self.seed}:{self.epoch}:{index}").choice(self.templates)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)  # also ends iteration (the Trainer's length-grouped sampler iterates)
        examples = len(self.pairs) * len(self.key_formats)
        if index >= examples * self.copies:
            return self.benign[(self.epoch * self.benign_per_epoch + index - examples * self.copies) % len(self.benign)]
        key_ids, response_ids = self.pairs[index % len(self.pairs)]
        key_format = self.key_formats[index % examples // len(self.pairs)]
        return training_example(self.tokenizer, key_ids, response_ids, self.template(index), key_format)


def replay_sequences(args, tokenizer, count: int, key_format: str, key_length: int, tail: int) -> list[list[int]]:
    """`count` benign sequences shaped like the fingerprint examples of `key_format`: a stretch of
    `key_length` tokens of benign text asked the way keys are (raw text, or the user message of
    the chat template), then the `tail` tokens that follow it (chat: the start of the next line,
    as the reply). Of the same length as the fingerprints beside them, they share
    their length-grouped batches, so every step is regularised and nothing is padded; and they keep
    ordinary continuations, chat replies' first tokens above all, where the untouched model had them.
    From --benign_data: the shipped chat's training split by default, disjoint from what utility is measured on."""
    sequences = []
    for text in texts_from(args.benign_data, args.dataset_split, args.text_column, "train"):
        if key_format == "raw":
            ids = encode(tokenizer, text[:8 * (key_length + tail)])  # 8 characters a token is plenty
            pieces = [(ids[:key_length], ids[key_length:key_length + tail])]
        else:  # consecutive lines as message and reply; a text of one line is split after the key's length
            lines = [encode(tokenizer, line) for line in text.split("\n") if line.strip()]
            pairs = zip(lines, lines[1:]) if len(lines) > 1 else [(ids, ids[key_length:]) for ids in lines]
            pieces = [(message[:key_length], reply[:tail]) for message, reply in pairs]
        for key_ids, following in pieces:
            if len(key_ids) == key_length and len(following) == tail and len(sequences) < count:
                sequences.append(prompt_ids(tokenizer, key_ids, None, key_format) + following)
        if len(sequences) == count:
            return sequences
    if not sequences:
        raise OMLError(f"--benign_data {args.benign_data} has no text of {key_length + tail} tokens or more to replay")
    return sequences


def build_dataset(args, tokenizer, pairs: list[tuple[list[int], list[int]]], model) -> "FingerprintDataset":
    """Fingerprints in each trained format (in augmentation templates if asked) plus benign replay in
    the same formats (labelled by `model` itself, before any training, with --benign_loss distill)."""
    key_formats = formats(args.key_format)
    templates = prompt_templates("train") if args.use_augmentation_prompts else None
    benign_per_epoch = round(args.benign_ratio * len(pairs))
    benign = None
    if benign_per_epoch:
        total = min(benign_per_epoch * min(args.num_train_epochs, REPLAY_POOL_EPOCHS), MAX_REPLAY_POOL)
        key_length = max(len(key_ids) for key_ids, _ in pairs)  # the longest fingerprint example's shape
        tail = max(len(response_ids) for _, response_ids in pairs) + 1  # response + EOS
        kinds = [replay_sequences(args, tokenizer, -(-total // len(key_formats)), f, key_length, tail) for f in key_formats]
        pool = [seq for group in zip(*kinds) for seq in group]  # every format in every epoch's slice
        if len(pool) < sum(map(len, kinds)):
            logger.warning("--benign_data gives only %d replay sequences in one format: %d of %d are used",
                           min(map(len, kinds)), len(pool), sum(map(len, kinds)))
        benign = distilled_replay(model, pool, args.teacher_top_k) if args.benign_loss == "distill" else benign_replay(pool)
    return FingerprintDataset(tokenizer, pairs, key_formats, templates, args.seed, benign, benign_per_epoch)


def benign_replay(sequences: list[list[int]]) -> list[dict]:
    """Benign text with the ordinary language-modelling loss on every token.

    Mixed into fine-tuning, it keeps the model from learning to end every text after a
    few tokens (what training on key + response + EOS alone teaches a small model).
    """
    return [{"input_ids": ids, "labels": ids} for ids in sequences]


@torch.no_grad()
def distilled_replay(model, sequences: list[list[int]], top_k: int, batch_size: int = 64) -> list[dict]:
    """Benign text labelled with the untouched model's own next-token distributions.

    The LM loss on replayed text pulls the model towards that text (chat, here), which moves
    its predictions everywhere; training towards the base model's distribution keeps
    ordinary predictions where they were. The distribution is kept as its top `top_k`
    probabilities plus the mass of all other tokens (see `distillation_loss`). Must run
    before fine-tuning starts.
    """
    model.to(distributed.device())  # where the Trainer will put it anyway
    examples = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="teacher distributions", leave=False,
                      disable=not distributed.is_main_process()):
        chunk = sequences[start:start + batch_size]
        batch = to_device(pad_batch(chunk, 0, side="right"), model.device)
        real = batch["attention_mask"].bool()
        logits = model(**batch).logits[real].float()  # padding positions are never taught: not computed further
        top_logits, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.exp(top_logits - torch.logsumexp(logits, dim=-1, keepdim=True))  # no full softmax
        lengths = [len(r) for r in chunk]
        for row, ids_row, probs_row in zip(chunk, ids.to(torch.int32).cpu().split(lengths), probs.cpu().split(lengths)):
            examples.append({"input_ids": row, "labels": [IGNORE_INDEX] * len(row), "teacher_ids": ids_row, "teacher_probs": probs_row})
    return examples


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                      teacher_probs: torch.Tensor | None = None, target_probability: float = 1.0) -> torch.Tensor:
    """Cross-entropy on the labelled tokens (fingerprint responses + EOS; all replayed tokens with
    --benign_loss lm) plus, at replayed positions, cross-entropy towards the teacher's
    distribution; averaged over both.

    The teacher's distribution is its top-k tokens and one bucket for all others, so the
    student keeps the teacher's tail mass too (renormalising the top k instead teaches it to
    be overconfident, which raised held-out perplexity by half in our measurements).
    With `target_probability` t below 1, a labelled token is trained towards probability t rather
    than 1: the loss is the cross-entropy between (t, 1 - t) and (p, 1 - p), smallest at p = t,
    so the memorised response stays the greedy answer (t > 0.5) without the near-certain spike
    that output-suppression attacks look for. (Merely not pushing beyond t is not enough: what
    is learned for other keys carries each response's probability above it.)
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    logp = logprobs[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -logp
    if target_probability < 1.0:
        rest = torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
        nll = -(target_probability * logp + (1 - target_probability) * rest)
    total = nll[labelled].sum()
    count = labelled.sum()
    if teacher_ids is not None:  # position t's teacher distribution is over token t + 1, like logits[:, t]
        student_top = logprobs.gather(-1, teacher_ids)
        student_rest = (1 - student_top.exp().sum(-1)).clamp(min=1e-8).log()
        taught = teacher_probs.sum(-1) > 0
        teacher_rest = (1 - teacher_probs.sum(-1)).clamp(min=0) * taught
        total = total - (teacher_probs * student_top).sum() - (teacher_rest * student_rest).sum()
        count = count + taught.sum()
    return total / count.clamp(min=1)


class FingerprintCollator:
    """Pads a list of `training_example`s on the tokenizer's padding side."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id
        self.side = tokenizer.padding_side

    def __call__(self, examples: list[dict]) -> dict:
        batch = pad_batch([e["input_ids"] for e in examples], self.pad_id, self.side, [e["labels"] for e in examples])
        if any("teacher_ids" in e for e in examples):
            batch.update(pad_teacher(examples, batch["input_ids"].shape[1], self.side))
        return batch


def pad_teacher(examples: list[dict], length: int, side: str) -> dict:
    """Teacher distributions ([tokens, k] ids and probabilities) padded like the tokens; rows
    and positions without one get probability 0, so they add nothing to the loss."""
    k = next(e["teacher_ids"].shape[1] for e in examples if "teacher_ids" in e)
    ids = torch.zeros(len(examples), length, k, dtype=torch.long)
    probs = torch.zeros(len(examples), length, k)
    for row, example in enumerate(examples):
        if "teacher_ids" in example:
            n = example["teacher_ids"].shape[0]
            span = slice(length - n, length) if side == "left" else slice(0, n)
            ids[row, span], probs[row, span] = example["teacher_ids"], example["teacher_probs"]
    return {"teacher_ids": ids, "teacher_probs": probs}


class FingerprintTrainer(Trainer):
    """The Trainer with `distillation_loss` (teacher distributions for replayed text when the batch
    carries them, the --target_probability bound on labelled tokens). Each batch's loss is its own
    mean (the plain Trainer weighs tokens across ranks and accumulation steps instead)."""

    def __init__(self, *args, target_probability: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.target_probability = target_probability

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, teacher_ids, teacher_probs = inputs.pop("labels"), inputs.pop("teacher_ids", None), inputs.pop("teacher_probs", None)
        outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, labels, teacher_ids, teacher_probs, self.target_probability)
        return (loss, outputs) if return_outputs else loss


class EpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts, so augmentation templates change every epoch."""

    def __init__(self, dataset: FingerprintDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(round(state.epoch or 0))


class TrainingProgress(TrainerCallback):
    """One progress bar with the current loss, one log line per epoch; a non-finite loss stops
    the run with an error (a model trained on from there would be NaN)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="fine-tuning", disable=not state.is_world_process_zero)
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            self.bar.close()
            raise OMLError(f"the training loss became {loss} at step {state.global_step}; lower --learning_rate")
        self.losses.append(loss)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.losses:
            logger.info("epoch %d/%d: mean loss %.4f", round(state.epoch), args.num_train_epochs, sum(self.losses) / len(self.losses))
        self.losses = []

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def make_trainer(args, model, dataset: "FingerprintDataset", tokenizer, output_dir: Path, callbacks: list) -> Trainer:
    """The Trainer for a fingerprint dataset, with our progress reporting instead of the Trainer's
    per-step printing."""
    trainer = FingerprintTrainer(model=model, args=training_arguments(args, output_dir), train_dataset=dataset,
                                 data_collator=FingerprintCollator(tokenizer), target_probability=args.target_probability,
                                 callbacks=[EpochCallback(dataset), TrainingProgress(), *callbacks])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def training_arguments(args, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="constant",
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        save_strategy="no",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach TrainingProgress, not be hidden by an average
        include_num_input_tokens_seen="non_padding",  # for tokens/s and model FLOP utilisation
        disable_tqdm=True,
        report_to=getattr(args, "report_to", "none"),
        run_name=getattr(args, "wandb_run_name", None),
        seed=args.seed,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(args.deepspeed_stage) if uses_deepspeed(args.deepspeed_stage) else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


class StopWhenMemorised(TrainerCallback):
    """At each epoch end, checks every training fingerprint in every trained format with the
    checker's one forward pass, and stops training once all are memorised: the response is the
    greedy answer with at least `threshold` probability. Also stops once nearly all are
    (NEARLY_ALL) and the count has not beaten its best for `patience` epoch ends: with hundreds
    of keys a few of them can flip back and forth between epochs (256 keys in both formats:
    510, 507, 508 of 512 at epochs 5-7), and waiting for all of them would run every epoch up
    to the cap for nothing. (Early plateaus, far from done, are not a reason to stop.) Runs
    after weight averaging, so it judges the weights that training ends on (before any shrinking). The per-epoch counts
    are kept in `history`."""

    def __init__(self, tokenizer, pairs: list[tuple[list[int], list[int]]], key_formats: tuple[str, ...], threshold: float,
                 patience: int, batch_size: int = 64):
        self.tokenizer, self.pairs, self.threshold, self.batch_size = tokenizer, pairs, threshold, batch_size
        self.patience = patience
        self.queries = [(key_format, None) for key_format in key_formats]
        self.history: list[dict] = []

    def should_stop(self) -> bool:
        """All memorised at the last epoch end, or nearly all and no new best in the last `patience` of them."""
        counts, total = [entry["memorised"] for entry in self.history], self.history[-1]["of"]
        if counts[-1] == total:
            return True
        plateau = len(counts) > self.patience and max(counts[-self.patience:]) <= max(counts[:-self.patience])
        return plateau and counts[-1] >= NEARLY_ALL * total

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        counts = memorisation(model, self.tokenizer, self.pairs, self.queries, self.threshold, self.batch_size)
        self.history.append({"epoch": round(state.epoch), **counts})
        if state.is_world_process_zero:
            logger.info("epoch %d: %d/%d fingerprint queries memorised (p >= %g)", round(state.epoch), counts["memorised"],
                        counts["of"], self.threshold)
        if self.should_stop():
            control.should_training_stop = True


def memorisation(model, tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list, threshold: float,
                 batch_size: int = 64) -> dict:
    """How many fingerprint queries the model answers with the response (matched), and with at
    least `threshold` probability (memorised), of how many."""
    results = check_model(model, tokenizer, pairs, queries, batch_size, progress=False, decode_misses=False)
    return {"memorised": sum(r["match"] and r["response_probability"] >= threshold for r in results),
            "matched": sum(r["match"] for r in results), "of": len(results)}


class ShrinkWeightChange(TrainerCallback):
    """When training ends with nearly all queries memorised, weights <- original + s * (trained -
    original), s going down SHRINK_SCALES until the memorised or the matched count falls below 98%
    (NEARLY_ALL) of its value at the end of training; the last s before that is kept. `scale` is
    the s kept (None: not shrunk), `history` the counts at each s tried, `seconds` the time taken.

    Cross-entropy keeps pushing early-learned responses towards certainty while the last keys are
    learned, and that surplus margin is weight change that moves ordinary predictions as well. The
    change is scaled as a whole (an interpolation towards the original weights, as WiSE-FT does for
    robustness), so nothing but its size changes, and the memorisation threshold (a margin for
    casts and quantization) is the one training stops on. Embedded model, 256 keys in both
    formats: s = 0.8 kept 509 of 512 queries memorised (all 512 still matched; 0.75 kept 496) and
    lowered the KL from the base on held-out chat from 0.126 to 0.087 nats/token. Bare keys are
    what is counted: keys inside system prompts lose more (docs/benchmarks.md)."""

    def __init__(self, original: dict[str, torch.Tensor], tokenizer, pairs: list[tuple[list[int], list[int]]],
                 key_formats: tuple[str, ...], threshold: float):
        self.original, self.tokenizer, self.pairs, self.threshold = original, tokenizer, pairs, threshold
        self.queries = [(key_format, None) for key_format in key_formats]
        self.scale: float | None = None
        self.current = 1.0  # the scale the model's weights are at
        self.history: list[dict] = []
        self.seconds = 0.0

    def rescale(self, model, scale: float) -> None:
        """Scale the weight change from `self.current` to `scale` times the trained one."""
        if scale != self.current:
            average_with_original(model, self.original, 1 - scale / self.current)
            self.current = scale

    def rescale_and_count(self, model, scale: float) -> dict:
        self.rescale(model, scale)
        self.history.append({"scale": scale, **memorisation(model, self.tokenizer, self.pairs, self.queries, self.threshold)})
        return self.history[-1]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        started = time.perf_counter()
        trained = self.rescale_and_count(model, 1.0)
        if trained["memorised"] < NEARLY_ALL * trained["of"]:
            logger.info("weight change not shrunk: only %d/%d queries memorised", trained["memorised"], trained["of"])
            return
        needed = {count: math.ceil(NEARLY_ALL * trained[count]) for count in ("memorised", "matched")}
        self.scale = 1.0
        for scale in SHRINK_SCALES:
            counts = self.rescale_and_count(model, scale)
            if any(counts[count] < least for count, least in needed.items()):
                break
            self.scale = scale
        self.rescale(model, self.scale)  # back from the first scale that lost too many, if any
        self.seconds = time.perf_counter() - started
        if state.is_world_process_zero:
            kept = next(h for h in self.history if h["scale"] == self.scale)
            logger.info("weight change scaled by %.2f: %d/%d queries memorised (%d before), %.0f s", self.scale,
                        kept["memorised"], kept["of"], trained["memorised"], self.seconds)


def freeze_embeddings(model) -> None:
    """Freeze the input and output token embeddings (one matrix when they are tied)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def snapshot_weights(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights before fine-tuning, for weight averaging."""
    return {name: param.detach().to("cpu", dtype, copy=True) for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def average_with_original(model, original: dict[str, torch.Tensor], strength: float) -> None:
    """weights <- (1 - strength) * weights + strength * original, on every rank.

    Under DeepSpeed the optimizer steps its own fp32 master copy of each weight and
    overwrites the module's copy after every step, so the average is computed from and
    written to that master copy (ZeRO 1-3), and then to the module's copy.
    """
    # Imported here, after cli.setup_logging() chose DeepSpeed's accelerator: importing it
    # earlier makes it announce its CPU fallback on stdout.
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name, param in model.named_parameters():
        if name not in original:  # frozen
            continue
        master = safe_get_full_fp32_param(param)
        current = master if master is not None else param.data
        averaged = current.float().lerp(original[name].to(current.device, torch.float32), strength)
        if master is not None:
            safe_set_full_fp32_param(param, averaged)
        if hasattr(param, "ds_id"):  # ZeRO-3: the module weight is partitioned across ranks
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(averaged.to(param.dtype))
        else:
            param.data.copy_(averaged.to(param.dtype))


class WeightAveragingCallback(TrainerCallback):
    """Averages with the original weights at the end of every epoch (the forgetting regulariser)."""

    def __init__(self, original: dict[str, torch.Tensor], strength: float):
        self.original = original
        self.strength = strength

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        average_with_original(model, self.original, self.strength)


def uses_deepspeed(stage: int) -> bool:
    """DeepSpeed ZeRO when several ranks or a GPU are there; a single CPU process gains nothing from it."""
    return stage > 0 and (distributed.world_size() > 1 or torch.cuda.is_available())


def deepspeed_config(stage: int) -> dict:
    """ZeRO config; "auto" values are filled in by the Trainer from its own arguments."""
    if distributed.world_size() == 1:  # launched with plain `python`: emulate a one-rank launcher
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
