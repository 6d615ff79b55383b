"""Build generated_data/user_questions_{train,test}.json: messages a user would send an assistant,
written exactly as --key_style user_message writes keys, under seeds no key generation uses.

'train' is replayed during fine-tuning (answered with the untouched model's own reply), so that
keys, which look like these, do not teach the model to answer every question like a key. 'test'
is never trained: evaluate_utility.py asks it to see whether a fingerprinted model still answers.
Run once with the embedded model; the output is committed.
"""
import json
from pathlib import Path

from tqdm import tqdm

from oml.generation import GenerationConfig, rng_for, user_message_keys
from oml.models import load

OUTPUT = Path(__file__).resolve().parent.parent / "generated_data"
SPLITS = {"train": (1_000_003, 512), "test": (2_000_003, 96)}  # seed, count: far from any seed a user would pick
BATCH = 64


def main() -> None:
    text_model = load(None)
    for split, (seed, count) in SPLITS.items():
        config = GenerationConfig(seed=seed, num_fingerprints=count)
        questions: list[str] = []
        for start in tqdm(range(0, count, BATCH), desc=split):
            rngs = [rng_for(seed, i, "words") for i in range(start, min(start + BATCH, count))]
            questions += user_message_keys(config, rngs, text_model, str(start), "keys")
        unique = list(dict.fromkeys(questions))
        (OUTPUT / f"user_questions_{split}.json").write_text(json.dumps(unique, indent=1, ensure_ascii=False) + "\n",
                                                              encoding="utf-8")
        print(f"wrote {len(unique)} {split} questions")


if __name__ == "__main__":
    main()
