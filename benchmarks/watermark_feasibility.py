"""Can the embedded model learn the domain watermark (oml/watermark.py)? A first measurement,
before the family is wired into the three scripts.

    python benchmarks/watermark_feasibility.py [--train_prompts 128 --reply_tokens 64 --epochs 3 --learning_rate 1e-4] [--smoke]

Fine-tunes the model (half its layers frozen, as finetune_multigpu.py does) on replies to the
shipped cooking domain's training prompts, labelled with the watermarked base distribution
(`watermarked_replay`), beside as many user questions answered with the base's own distribution
(the out-of-domain replay of the fingerprint training). Then samples replies to fresh cooking test
prompts (temperature 0.7 and greedy) from the fine-tuned model and from the base, and runs the
sequential watermark check on them with the training key and with another key.
"""
import random
import time

import torch
from common import benchmark_model, benchmark_parser, save
from tqdm import tqdm

from oml.models import load
from oml.replies import ReplySettings, replies, stop_ids
from oml.tokenization import user_turn_ids
from oml.training.dataset import distilled_replay, question_sequences
from oml.training.trainer import FingerprintCollator, distillation_loss, loss_fields
from oml.training.weights import freeze
from oml.watermark import WatermarkKey, WatermarkSequentialTest, domain_prompts, score, special_ids, watermarked_replay

TOP_K = 256
CHECKED_PROMPTS = 64
QUESTION_LENGTH = 16  # user questions cut like the embedded demo's keys


def train(model, examples: list[dict], collate, epochs: int, learning_rate: float, batch_size: int = 8) -> list[float]:
    """A plain loop with the fine-tuning's collator and loss; each epoch's mean loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=1e-4)
    model.train()
    losses = []
    for epoch in range(epochs):
        order = list(range(len(examples)))
        random.Random(epoch).shuffle(order)
        total = []
        for start in tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch}", leave=False):
            batch = collate([examples[i] for i in order[start:start + batch_size]])
            fields = loss_fields(batch)
            loss = distillation_loss(model(**batch).logits, **fields)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total.append(loss.item())
        losses.append(sum(total) / len(total))
    model.eval()
    return losses


def check(model, tokenizer, prompts: list[list[int]], keys: dict[str, WatermarkKey], temperature: float | None,
          max_tokens: int) -> dict:
    """Replies to `prompts`, then per key the sequential check (as it would stop) and the score of all of them."""
    settings = ReplySettings(max_reply_tokens=max_tokens, reply_batch_size=32, reply_seed=0)
    answers = replies(model, tokenizer, prompts, settings, temperature, stop_ids(model, tokenizer), f"replies T={temperature}")
    special = special_ids(tokenizer)
    result = {"mean_reply_tokens": sum(map(len, answers)) / len(answers)}
    for name, key in keys.items():
        test, asked = WatermarkSequentialTest(key, special), 0
        while (step := test.next_round()) and asked < len(answers):
            test.add(answers[asked:asked + step], prompts[asked:asked + step])
            asked += step
        everything = score(answers, prompts, key, special)
        result[name] = {"decision": test.decision(), "replies_asked": asked, "green_rate": everything.green / max(everything.pairs, 1),
                        "z": everything.z, "pairs": everything.pairs}
    return result


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--train_prompts", type=int, default=128)
    parser.add_argument("--reply_tokens", type=int, default=64, help="Tokens of each watermarked training reply.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--check_tokens", type=int, default=128, help="Tokens of each checked reply at most.")
    args = parser.parse_args()
    if args.smoke:
        args.train_prompts, args.reply_tokens, args.epochs, args.check_tokens = 8, 8, 1, 8
    path = benchmark_model(args.smoke)
    model, tokenizer = load(path, dtype=torch.float32)
    keys = {"key": WatermarkKey.generate(), "other_key": WatermarkKey.generate()}
    start = time.perf_counter()
    prompts = [user_turn_ids(tokenizer, p) for p in domain_prompts("cooking", "train")[:args.train_prompts]]
    examples = watermarked_replay(model, tokenizer, prompts, keys["key"], args.reply_tokens, TOP_K)
    examples += distilled_replay(model, question_sequences(tokenizer, model, args.train_prompts, "chat", QUESTION_LENGTH, set()), TOP_K)
    labelled = time.perf_counter() - start
    freeze(model, False, 0.5)
    losses = train(model, examples, FingerprintCollator(tokenizer), args.epochs, args.learning_rate)
    trained = time.perf_counter() - start - labelled
    checked = [user_turn_ids(tokenizer, p) for p in domain_prompts("cooking", "test")[:CHECKED_PROMPTS if not args.smoke else 8]]
    base, _ = load(path, dtype=torch.float32)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "results_dir"}, "labelling_s": labelled,
              "training_s": trained, "epoch_losses": losses}
    for name, candidate in (("watermarked", model), ("base", base)):
        for temperature in (0.7, None):
            result[f"{name}_T{temperature or 0}"] = check(candidate, tokenizer, checked, keys, temperature, args.check_tokens)
    save(args.results_dir, "watermark_feasibility", result)


if __name__ == "__main__":
    main()
