"""Build generated_data/words.txt: common lowercase English words for keys and responses.

Source: the noun, verb and adjective lists of the `wonderwords` package (MIT), minus its
profanity list, keeping plain lowercase words of 3 to 10 letters. Run once; the output is
committed so that users need not install wonderwords.
"""
import importlib.util
from pathlib import Path

ASSETS = Path(importlib.util.find_spec("wonderwords").submodule_search_locations[0]) / "assets"
OUTPUT = Path(__file__).resolve().parent.parent / "generated_data" / "words.txt"


def read_words(name: str) -> set[str]:
    return {line.strip() for line in (ASSETS / name).read_text(encoding="utf-8").splitlines()}


def main() -> None:
    candidates = read_words("nounlist.txt") | read_words("verblist.txt") | read_words("adjectivelist.txt")
    banned = {word.lower() for word in read_words("profanitylist.txt")}
    words = sorted(w for w in candidates if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 10 and w not in banned)
    OUTPUT.write_text("\n".join(words) + "\n", encoding="utf-8")
    print(f"wrote {len(words)} words to {OUTPUT}")


if __name__ == "__main__":
    main()
