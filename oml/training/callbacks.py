"""What happens between training steps: the dataset's epoch, progress reporting, stopping once the
fingerprints are memorised, averaging with the original weights, and shrinking the weight change.

Stopping and shrinking judge the model by one `MemorisationProbe`, so they count the same thing
the same way, and a count of the final weights is made once."""
import logging
import math
import random
import time

import torch
from tqdm import tqdm
from transformers import TrainerCallback

from oml import OMLError
from oml.checking import KeyResult, Query, check_model
from oml.tokenization import response_pairs
from oml.training.dataset import FingerprintDataset
from oml.training.weights import average_with_original

logger = logging.getLogger(__name__)

NEARLY_ALL = 0.98  # memorised share from which a plateau ends training (--memorised_patience) and shrinking may start
SHRINK_SCALES = tuple(round(1 - 0.05 * i, 2) for i in range(1, 11))  # 0.95 down to 0.5: --shrink_weight_change tries these in turn


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


class MemorisationProbe:
    """How many fingerprint queries (every key, bare, in every trained format) the model answers with
    the response (matched), and with at least `threshold` probability (memorised), of how many: the
    checker's own forward pass. A key with k accepted responses is memorised when each of them
    starts with one of the k likeliest first tokens and has at least `threshold`/k probability: then
    a server that bans the likeliest answer's word still serves another response. The last count is
    kept with the training step it was made at, so a second look at the same weights (the shrink's
    starting point) costs nothing.

    At an epoch end (`count_at_epoch_end`) with more than 2 x SAMPLE_KEYS keys, a fixed sample of
    SAMPLE_KEYS keys is counted first. Training can only be done when all, or NEARLY_ALL, of the
    queries are memorised; when fewer than FAR_FROM_DONE of the sample's are, it is not (at 98%
    memorised, a sample of 256 keys falls under 88% with a probability below 1e-12), and the
    sample's share, scaled to every query, stands for the count. At 1,024 keys in both formats this
    skips seven eighths of the check in the early epochs."""

    SAMPLE_KEYS = 256
    FAR_FROM_DONE = NEARLY_ALL - 0.1

    def __init__(self, tokenizer, pairs: list[tuple[list[int], list[int]]], key_formats: tuple[str, ...], threshold: float,
                 batch_size: int = 64):
        self.tokenizer, self.pairs, self.threshold, self.batch_size = tokenizer, pairs, threshold, batch_size
        self.queries = [Query(key_format) for key_format in key_formats]
        self.last: tuple[int, dict] | None = None  # (global step, counts)
        sampled = len(pairs) > 2 * self.SAMPLE_KEYS  # the same keys on every rank and every epoch
        self.sample = sorted(random.Random(0).sample(range(len(pairs)), self.SAMPLE_KEYS)) if sampled else None

    def count(self, model, step: int | None = None) -> dict:
        """The counts for the model's weights now; `step`: the training step they are at, when they
        are a Trainer's (None: weights changed outside training, always counted)."""
        if step is not None and self.last is not None and self.last[0] == step:
            return self.last[1]
        counts = self.counts_of(model, self.pairs)
        self.last = (step, counts) if step is not None else None
        return counts

    def count_at_epoch_end(self, model, step: int) -> dict:
        """`count`, or, while the sample shows training far from done, its estimate."""
        estimate = self.estimate(model)
        if estimate is not None and estimate["memorised"] < self.FAR_FROM_DONE * estimate["of"]:
            return estimate
        return self.count(model, step)

    def estimate(self, model) -> dict | None:
        """The sample's counts scaled to every query, marked with the number of keys sampled (None:
        too few keys to sample)."""
        if self.sample is None:
            return None
        sample = self.counts_of(model, [self.pairs[i] for i in self.sample])
        total = len(self.queries) * len(self.pairs)
        return {**{name: round(sample[name] / sample["of"] * total) for name in ("memorised", "matched")},
                "of": total, "sampled_keys": len(self.sample)}

    def counts_of(self, model, pairs: list[tuple[list[int], list[int]]]) -> dict:
        results = check_model(model, self.tokenizer, pairs, self.queries, self.batch_size, progress=False,
                              decode_misses=False, per_response=True)
        _, owners = response_pairs(pairs)
        per_key: dict[tuple[int, int], list[KeyResult]] = {}
        for result in results:
            per_key.setdefault((result.query, owners[result.index]), []).append(result)
        return {"memorised": sum(memorised(rows, self.threshold) for rows in per_key.values()),
                "matched": sum(any(r.match for r in rows) for rows in per_key.values()), "of": len(per_key)}


def memorised(rows: list[KeyResult], threshold: float) -> bool:
    """Whether one query's results, one per accepted response, show the key memorised (see
    `MemorisationProbe`); with one response: served, with at least `threshold` probability."""
    if len(rows) == 1:
        return bool(rows[0].match) and rows[0].response_probability >= threshold
    return all(r.response_rank <= len(rows) and r.response_probability >= threshold / len(rows) for r in rows)


class StopWhenMemorised(TrainerCallback):
    """At each epoch end, counts the memorised fingerprint queries, and stops training once all are, or
    `share` of them (a count of every query, never a sample's estimate). Also stops once nearly all
    are (NEARLY_ALL) and the count has not beaten its best for `patience` epoch ends: with hundreds
    of keys a few of them can flip back and forth between epochs (256 keys in both formats: 510,
    507, 508 of 512 at epochs 5-7), and waiting for all of them would run every epoch up to the cap
    for nothing. (Early plateaus, far from done, are not a reason to stop.) Runs after weight
    averaging, so it judges the weights that training ends on (before any shrinking). The per-epoch
    counts are kept in `history`; those estimated from a sample (`MemorisationProbe`) say how many
    keys it held (`sampled_keys`)."""

    def __init__(self, probe: MemorisationProbe, patience: int, share: float = 1.0):
        self.probe, self.patience, self.share = probe, patience, share
        self.history: list[dict] = []

    def should_stop(self) -> bool:
        """`share` memorised at the last epoch end, or nearly all and no new best in the last `patience` of them."""
        counts, total = [entry["memorised"] for entry in self.history], self.history[-1]["of"]
        if counts[-1] >= math.ceil(self.share * total) and "sampled_keys" not in self.history[-1]:
            return True
        plateau = len(counts) > self.patience and max(counts[-self.patience:]) <= max(counts[:-self.patience])
        return plateau and counts[-1] >= NEARLY_ALL * total

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        counts = self.probe.count_at_epoch_end(model, state.global_step)
        self.history.append({"epoch": round(state.epoch), **counts})
        if state.is_world_process_zero:
            estimate = f" (estimated from {counts['sampled_keys']} keys)" if "sampled_keys" in counts else ""
            logger.info("epoch %d: %d/%d fingerprint queries memorised (p >= %g)%s", round(state.epoch), counts["memorised"],
                        counts["of"], self.probe.threshold, estimate)
        if self.should_stop():
            control.should_training_stop = True


class ShrinkWeightChange(TrainerCallback):
    """When training ends with nearly all queries memorised, weights <- original + s * (trained -
    original), s going down SHRINK_SCALES until the memorised or the matched count falls below 98%
    (NEARLY_ALL) of its value at the end of training; the last s before that is kept. `scale` is
    the s kept (None: not shrunk), `history` the counts at each s tried (a sample's estimates marked
    with `sampled_keys`, so an s can appear twice), `seconds` the time taken.

    Cross-entropy keeps pushing early-learned responses towards certainty while the last keys are
    learned, and that surplus margin is weight change that moves ordinary predictions as well. The
    change is scaled as a whole (an interpolation towards the original weights, as WiSE-FT does for
    robustness), so nothing but its size changes, and the memorisation threshold (a margin for
    casts and quantization) is the one training stops on. Embedded model, 256 keys in both
    formats: s = 0.8 kept 509 of 512 queries memorised (all 512 still matched; 0.75 kept 496) and
    lowered the KL from the base on held-out chat from 0.126 to 0.087 nats/token. Bare keys are
    what is counted: keys inside system prompts lose more (docs/benchmarks.md).

    Where the probe holds a sample (over 512 keys), each scale is first judged by the sample's
    estimate, and only the scale it would keep is counted in full, stepping back up while that count
    loses too many: at 1,024 keys in both formats, four screens of a quarter of the keys and one
    full count instead of four full counts. The estimates are judged against 98% of the full count
    at the end of training, so a sample that reads low stops the search a scale early (it never
    keeps a scale that every key did not confirm)."""

    def __init__(self, original: dict[str, torch.Tensor], probe: MemorisationProbe):
        self.original, self.probe = original, probe
        self.scale: float | None = None
        self.current = 1.0  # the scale the model's weights are at
        self.history: list[dict] = []
        self.seconds = 0.0

    def rescale(self, model, scale: float) -> None:
        """Scale the weight change from `self.current` to `scale` times the trained one."""
        if scale != self.current:
            average_with_original(model, self.original, 1 - scale / self.current)
            self.current = scale

    def rescale_and_count(self, model, scale: float, step: int | None = None, estimate: bool = False) -> dict:
        """The counts at `scale`; `estimate`: the sample's estimate where the probe has a sample."""
        self.rescale(model, scale)
        counts = self.probe.estimate(model) if estimate else None
        self.history.append({"scale": scale, **(counts or self.probe.count(model, step))})
        return self.history[-1]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        started = time.perf_counter()
        trained = self.rescale_and_count(model, 1.0, state.global_step)  # the stopper's last count, if it made one
        if trained["memorised"] < NEARLY_ALL * trained["of"]:
            logger.info("weight change not shrunk: only %d/%d queries memorised", trained["memorised"], trained["of"])
            return
        needed = {count: math.ceil(NEARLY_ALL * trained[count]) for count in ("memorised", "matched")}

        def keeps(counts: dict) -> bool:
            return all(counts[count] >= least for count, least in needed.items())

        scales = (1.0, *SHRINK_SCALES)
        index = 0  # of the smallest scale that keeps enough so far
        while index + 1 < len(scales) and keeps(self.rescale_and_count(model, scales[index + 1], estimate=True)):
            index += 1
        if "sampled_keys" in self.history[-1]:  # the estimate chose: a full count confirms it, or the next scale up
            while index > 0 and not keeps(self.rescale_and_count(model, scales[index])):
                index -= 1
        self.scale = scales[index]
        self.rescale(model, self.scale)  # back from the last scale counted, if it lost too many
        self.seconds = time.perf_counter() - started
        if state.is_world_process_zero:
            kept = next(h for h in reversed(self.history) if h["scale"] == self.scale and "sampled_keys" not in h)
            logger.info("weight change scaled by %.2f: %d/%d queries memorised (%d before), %.0f s", self.scale,
                        kept["memorised"], kept["of"], trained["memorised"], self.seconds)


class WeightAveragingCallback(TrainerCallback):
    """Averages with the original weights at the end of every epoch (the forgetting regulariser)."""

    def __init__(self, original: dict[str, torch.Tensor], strength: float):
        self.original = original
        self.strength = strength

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        average_with_original(model, self.original, self.strength)
