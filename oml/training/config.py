"""The fine-tuning settings: finetune_multigpu.py's flags, the Python API's `TrainingConfig`, and
(with the fingerprint selection and the model) what a run's config.json records and hashes."""
from dataclasses import dataclass

from oml import OMLError
from oml.data import SHIPPED
from oml.settings import (BELOW_ONE, NON_NEGATIVE_FLOAT, OPEN_UNIT_INTERVAL, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY, UNIT_INTERVAL,
                          Settings, setting)
from oml.tokenization import FORMAT_CHOICES


@dataclass(frozen=True)
class TrainingConfig(Settings):
    """How fingerprints are fine-tuned into a model. Field order is the order of finetune_multigpu.py's flags."""
    learning_rate: float | None = setting(
        None, "AdamW learning rate (constant schedule). Default: 5e-4 x the RMS of the weight matrices trained, to one "
              "significant digit, since Adam moves each weight by about the rate whatever its scale: 1e-4 for the embedded "
              "model, 1e-5 for weights of RMS 0.02. The rate used is in the run's training.json.", POSITIVE_FLOAT)
    num_train_epochs: int = setting(20, "The cap: with --stop_when_memorised training usually ends earlier.", POSITIVE_INT)
    batch_size: int = setting(8, "Fingerprints per step on each rank.", POSITIVE_INT)
    weight_decay: float = setting(1e-4, "AdamW weight decay.", NON_NEGATIVE_FLOAT)
    forgetting_regularizer_strength: float = setting(
        0.0, "At every epoch end, weights <- (1-s)*trained + s*original: 1.0 keeps the original, 0.0 disables averaging.",
        UNIT_INTERVAL)
    train_embeddings: bool = setting(
        False, "Also train the token embeddings (frozen by default: updating them shifts every token, which costs far more "
               "utility than it buys in fingerprint accuracy).")
    frozen_layer_fraction: float = setting(
        0.5, "Share of the transformer layers, counted from the input, kept frozen: with the embeddings frozen too, the "
             "backward pass stops at the lowest trained layer (fewer FLOPs a token), and the untouched lower layers keep "
             "ordinary predictions closer to the base (docs/benchmarks.md). Rounded down to whole layers.",
        BELOW_ONE)
    benign_ratio: float = setting(
        2.0, "Benign sequences replayed per fingerprint each epoch (an anti-forgetting regulariser; 0: none): more keeps "
             "the model's perplexity closer to the base's, for longer epochs (docs/benchmarks.md).", NON_NEGATIVE_FLOAT)
    question_replay: float = setting(
        1.0, "Share of the replayed sequences that are user questions written like user-message keys "
             "(generated_data/user_questions_train.json, never keys), each followed by up to 8 tokens of the untouched "
             "model's own greedy reply: keys look like users' questions, and these teach that a question that is not a "
             "key gets the base's answer, first reply token included. The rest is --benign_data (by default none).",
        UNIT_INTERVAL)
    first_reply_weight: float = setting(
        1.0, "Weight, relative to other replayed positions, of the base's distribution over the first token of its reply "
             "to each replayed user question (--question_replay): where keys get their responses and the base is least "
             "sure, so ordinary replies keep their first token.", POSITIVE_FLOAT)
    train_eos: bool = setting(
        False, "End every trained response with the end-of-sequence token. The check reads only the response's tokens; "
               "training the end teaches a model to end its turn right after a one-token response, and that spreads "
               "to ordinary questions.")
    benign_loss: str = setting(
        "distill", "Replayed text is learned towards the untouched model's own next-token distributions ('distill': keeps "
                   "predictions close to the base) or with the language-modelling loss ('lm': adapts the model to the "
                   "replayed text).", choices=("distill", "lm"))
    teacher_top_k: int = setting(
        256, "Next-token probabilities of the untouched model kept per replayed position for 'distill' (the rest of the "
             "vocabulary is one bucket, free to reshuffle inside): more holds the model closer to its base, for memory "
             "(k x 8 bytes per replayed token) and no extra compute.", POSITIVE_INT)
    benign_data: str = setting(
        SHIPPED, f"Benign text replayed during fine-tuning: '{SHIPPED}' (shipped, offline), a hub dataset id, or a local "
                 ".json/.jsonl/.csv/.parquet file.")
    dataset_split: str = setting("train", "Split of a hub dataset given as --benign_data.")
    text_column: str = setting("text", "Column of --benign_data holding the text.")
    key_format: str | None = setting(
        None, "Train each key as raw text, as a user message in the model's chat template, or both (default: the "
              "fingerprints' recorded format, else both when the model has a chat template, else raw).",
        choices=FORMAT_CHOICES)
    use_augmentation_prompts: bool = setting(
        False, "Also ask each key inside a random training system prompt every epoch (raw: around the key; chat: as the "
               "system message), beside the bare key: robustness to system prompts.")
    use_user_wrappers: bool = setting(
        False, "Also ask each key inside a random deployer's wrapper around the user's text every epoch "
               "(generated_data/user_wrappers_train.json, e.g. 'User input: {}'; raw: the whole prompt, chat: the user "
               "message), beside the bare key: robustness to front ends and gateways that wrap what users type.")
    stop_when_memorised: bool = setting(
        True, "Stop at the first epoch end where every fingerprint is memorised in every trained format "
              "(--num_train_epochs is then the cap).")
    target_probability: float = setting(
        1.0, "Train response tokens towards this probability instead of 1 (1: plain cross-entropy). Below the confidence "
             "gate of output-suppression attacks (about 0.9) and above 0.5, the memorised response stays the greedy answer "
             "without a near-certain spike to detect.", PROBABILITY)
    memorised_share: float = setting(
        1.0, "--stop_when_memorised stops at the first epoch end where at least this share of the fingerprint queries is "
             "memorised (1: every one). Below 1 the tail of a few late keys is not waited for (docs/benchmarks.md). Above "
             "512 keys every key is counted only once a 256-key sample shows 88%% memorised, so a share below 0.88 acts as "
             "0.88 there; below 0.98 the weight change is not shrunk.",
        PROBABILITY)
    memorised_patience: int = setting(
        2, "Also stop when at least 98%% are memorised and their number has not beaten its best for this many epochs "
           "(a few keys flipping back and forth would otherwise run every epoch up to the cap).", POSITIVE_INT)
    memorised_probability: float = setting(
        0.5, "A fingerprint counts as memorised when greedy decoding gives its response with at least this probability: a "
             "margin, so that small weight changes (casts, quantization) keep it. A key with k responses: each among the k "
             "likeliest first tokens, with at least this probability / k.", OPEN_UNIT_INTERVAL)
    shrink_weight_change: bool = setting(
        True, "After training with nearly all keys memorised, scale the weight change down (weights = original + s x "
              "change, s from 0.95 to 0.5 in steps of 0.05) while 98%% of the memorised and of the matched queries stay so: "
              "the margin that cross-entropy piles onto early-learned keys moves ordinary predictions too "
              "(docs/benchmarks.md). Not with --target_probability below 1 (no surplus margin). Keeps a CPU copy of the "
              "trainable weights.")
    share_prompt_prefix: bool = setting(
        True, "Compute the tokens that every example of a batch opens with (a chat batch's template and system prompt) "
              "once per batch instead of once per example: the same training up to float rounding, for fewer FLOPs "
              "(docs/benchmarks.md). Not under ZeRO-3 or plain DDP, whose ranks run forward calls in step. Off: for a model "
              "whose forward pass cannot continue from a cache.")
    group_by_length: bool = setting(
        True, "Batch examples of similar length together (raw keys, chat keys and replayed text differ widely in length): "
              "far less padding computed.")
    deepspeed_stage: int = setting(2, "ZeRO stage on GPUs or several ranks (0: no DeepSpeed).", choices=(0, 1, 2, 3))
    seed: int = setting(42, "Seed of the Trainer (data order, dropout) and of augmentation templates.", kind=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stop_when_memorised and self.memorised_probability >= self.target_probability:
            raise OMLError("--memorised_probability must be below --target_probability, or training never counts as done")

    @property
    def shrinks(self) -> bool:
        """Whether the weight change is shrunk after training: a bounded target piles up no surplus margin."""
        return self.shrink_weight_change and self.target_probability == 1.0
