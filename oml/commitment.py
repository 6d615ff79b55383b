"""A SHA-256 Merkle commitment over a run's fingerprints: publish one root, reveal keys later.

At fine-tuning time the owner publishes the root (e.g. on the model card). Later, to show a
third party that some keys were there all along, the owner reveals those records with their
salts and inclusion proofs; anyone can check them against the published root. Each leaf is
salted with 32 secret random bytes, so neither the root nor a proof (which holds only salted
sibling hashes) says anything about the keys that stay unrevealed, and a guessed key cannot be
confirmed by hashing it.

The tree is RFC 6962's (section 2.1): leaves and inner nodes are hashed with different prefix
bytes, so a leaf can never pass as an inner node, and any number of leaves works without
duplicating one. Only the five fields of `FIELDS` are committed, and `OTHER_RESPONSES` for a
key trained with several accepted responses: they fix which tokens were trained (the key and
responses as cut, and the format the key was asked in). A record without other responses hashes
as it did before that field existed, so earlier roots still open.

Files in the run folder: `commitment.json` (public: the root, how leaves are built and the test a
check will use, which the verifier reads from the published file) and
`commitment_salts.json` (private: the salts in record order, with the root they belong to).
Losing the salts makes the commitment unrevealable; publishing them reveals every key.
"""
import hashlib
import json
import re
import secrets
from pathlib import Path

from oml import OMLError
from oml.files import read_json, write_json_atomic

FIELDS = ("key", "response", "key_format", "key_length", "response_length")
# Committed only when non-empty: the leaves (and roots) of keys with one response stay as they were.
OTHER_RESPONSES = "other_responses"
# The --key_format choices (oml.tokenization.FORMAT_CHOICES, not imported: that module loads torch).
KEY_FORMATS = ("raw", "chat", "both")
SALT_BYTES = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
VERSION = 1
COMMITMENT_FILE = "commitment.json"
SALTS_FILE = "commitment_salts.json"

LEAF_ENCODING = (
    "Each leaf is one fingerprint as trained: the object {key, response, key_format, key_length, "
    "response_length, salt}, where key and response are strings, key_format is raw, chat or both, "
    "key_length and response_length are the token cuts (integers), and salt is 32 random bytes as "
    "64 lowercase hex digits. A key trained with more than one accepted response also holds "
    "other_responses: the other responses as cut, a list of distinct strings in the run's order; a key "
    "with one response has no such field (not an empty list). The object is encoded as "
    "json.dumps(obj, sort_keys=True, separators=(',', ':'), "
    "ensure_ascii=False) in UTF-8; the leaf hash is SHA-256(0x00 || encoding) and an inner node is "
    "SHA-256(0x01 || left || right). Leaves are in the run's fingerprint order and the tree is "
    "shaped as in RFC 6962 section 2.1 (the left subtree of n leaves holds the largest power of two "
    "smaller than n); inclusion proofs are RFC 9162 audit paths, sibling hashes from the leaf up."
)

_LOWER_HEX = re.compile(r"[0-9a-f]{64}")  # salts and written roots: one spelling each
_HASH = re.compile(r"[0-9a-fA-F]{64}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _other_responses(record: dict) -> list[str]:
    """The record's other responses, checked: each one more answer that counts as a match, so an
    empty or blank one (every answer starts with it) or a repeated one would be no evidence."""
    others = record.get(OTHER_RESPONSES, [])
    if not (isinstance(others, list) and all(isinstance(other, str) for other in others)):
        raise OMLError(f"a committed record's {OTHER_RESPONSES} must be a list of strings")
    if not all(other.strip() for other in others):
        raise OMLError(f"a committed record's {OTHER_RESPONSES} must not be empty or blank (any answer would match)")
    if len(set(others)) < len(others) or record["response"] in others:
        raise OMLError(f"a committed record's {OTHER_RESPONSES} must differ from each other and from its response")
    return others


def _record_fields(record) -> dict:
    """The committed fields of `record`, checked: the five of `FIELDS`, and its other responses when it
    has any; other fields are not committed and are dropped."""
    if not isinstance(record, dict):
        raise OMLError("a committed record must be an object")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise OMLError(f"a committed record lacks {', '.join(missing)}")
    if not (isinstance(record["key"], str) and isinstance(record["response"], str)):
        raise OMLError("a committed record's key and response must be strings")
    if record["key_format"] not in KEY_FORMATS:
        raise OMLError(f"a committed record's key_format must be one of {', '.join(KEY_FORMATS)}, not {record['key_format']!r}")
    if not (_positive_int(record["key_length"]) and _positive_int(record["response_length"])):
        raise OMLError("a committed record's key_length and response_length must be integers >= 1")
    others = _other_responses(record)
    return {name: record[name] for name in FIELDS} | ({OTHER_RESPONSES: list(others)} if others else {})


def committed_fields(record) -> dict:
    """Exactly what the leaf of `record` hashes (checked), and so all a verifier may rely on: a field
    added beside them in a revealed record is not under the root."""
    return _record_fields(record)


def _check_salt(salt_hex) -> None:
    # Lowercase only: the salt is hashed as text, so "AB" and "ab" would be different leaves.
    if not (isinstance(salt_hex, str) and _LOWER_HEX.fullmatch(salt_hex)):
        raise OMLError(f"a salt must be {SALT_BYTES} bytes as {2 * SALT_BYTES} lowercase hex digits")


def _hash_bytes(hex_text) -> bytes | None:
    """A SHA-256 hash from hex, or None for anything else (so verification can say False, not raise)."""
    if isinstance(hex_text, str) and _HASH.fullmatch(hex_text):
        return bytes.fromhex(hex_text)
    return None


def _check_leaves(leaves) -> None:
    if not isinstance(leaves, list) or not leaves:
        raise OMLError("a Merkle tree needs a non-empty list of leaf hashes")
    if not all(isinstance(leaf, bytes) and len(leaf) == 32 for leaf in leaves):
        raise OMLError("each leaf must be a 32-byte SHA-256 hash")


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """RFC 6962's split of n > 1 leaves: the largest power of two smaller than n goes left."""
    return 1 << ((n - 1).bit_length() - 1)


def committed_record(fingerprint: dict, key_format: str, key_length: int, response_length: int) -> dict:
    """The committed fields for a fingerprints.json record trained with the run's settings (its other
    responses too, when it has some): the settings belong in the leaf because the same key cut
    differently is a different fingerprint."""
    if not isinstance(fingerprint, dict):
        raise OMLError("a fingerprint must be an object with 'key' and 'response'")
    others = {OTHER_RESPONSES: fingerprint[OTHER_RESPONSES]} if OTHER_RESPONSES in fingerprint else {}
    return _record_fields({"key": fingerprint.get("key"), "response": fingerprint.get("response"),
                           "key_format": key_format, "key_length": key_length, "response_length": response_length, **others})


def leaf_hash(record: dict, salt_hex: str) -> bytes:
    """SHA-256(0x00 || canonical JSON of the record's committed fields and its salt): canonical so that
    a verifier rebuilds the same bytes from the revealed record, salted so the hash hides the key."""
    fields = _record_fields(record)
    _check_salt(salt_hex)
    text = json.dumps({**fields, "salt": salt_hex}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        encoding = text.encode("utf-8")
    except UnicodeEncodeError:
        raise OMLError("a committed record's key or a response is not valid Unicode (a lone surrogate)") from None
    return hashlib.sha256(LEAF_PREFIX + encoding).digest()


def _root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(_root(leaves[:k]), _root(leaves[k:]))


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962's Merkle tree hash of the leaf hashes, in order (one leaf is its own root)."""
    _check_leaves(leaves)
    return _root(leaves)


def _path(leaves: list[bytes], index: int) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return _path(leaves[:k], index) + [_root(leaves[k:])]
    return _path(leaves[k:], index - k) + [_root(leaves[:k])]


def inclusion_proof(leaves: list[bytes], index: int) -> list[str]:
    """The audit path of leaf `index`: the hex sibling hashes from the leaf up to the root, which
    with the leaf rebuild the root, and say nothing else about the other leaves (they are salted)."""
    _check_leaves(leaves)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(leaves):
        raise OMLError(f"leaf index {index!r} is not in 0..{len(leaves) - 1}")
    return [sibling.hex() for sibling in _path(leaves, index)]


def verify_inclusion(leaf: bytes, index: int, count: int, proof: list[str], root_hex: str) -> bool:
    """Whether `leaf` is leaf `index` of the `count`-leaf tree with root `root_hex`, by the RFC 9162
    (section 2.1.3.2) audit-path check. A verifier handles untrusted input, so anything malformed
    (a wrong index, count or proof length, bad hex) is False, never an exception. As in RFC 6962 the
    root does not fix the count on its own (leaf 0 of 3 also checks as leaf 0 of 4 when the paths have
    the same shape), so `count` must come from the published commitment, never from the prover."""
    root = _hash_bytes(root_hex)
    if root is None or not (isinstance(leaf, bytes) and len(leaf) == 32) or not isinstance(proof, list):
        return False
    if not (isinstance(index, int) and isinstance(count, int)) or isinstance(index, bool) or isinstance(count, bool):
        return False
    if not 0 <= index < count:
        return False
    siblings = [_hash_bytes(p) for p in proof]
    if any(s is None for s in siblings):
        return False
    fn, sn, r = index, count - 1, leaf
    for sibling in siblings:
        if sn == 0:  # the path is longer than the tree is deep
            return False
        if fn & 1 or fn == sn:  # sibling on the left: a right child, or a level's last node, which climbs unpaired until it is one
            r = _node(sibling, r)
            while not fn & 1 and fn != 0:  # climb past the levels where this node had no sibling
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_revealed(revealed: dict, count: int, root_hex: str) -> bool:
    """What a third party runs on one `revealed_records` entry: rebuild its leaf from the record
    and salt, then check the proof against the published root and count. False for anything malformed."""
    if not isinstance(revealed, dict):
        return False
    try:
        leaf = leaf_hash(revealed.get("record"), revealed.get("salt"))
    except OMLError:
        return False
    return verify_inclusion(leaf, revealed.get("position"), count, revealed.get("proof"), root_hex)


def _leaves(records: list[dict], salts: list[str]) -> list[bytes]:
    if not isinstance(records, list) or not records:
        raise OMLError("a commitment needs a non-empty list of fingerprint records")
    if not isinstance(salts, list) or len(salts) != len(records):
        raise OMLError(f"{len(records)} records need a list of {len(records)} salts")
    return [leaf_hash(record, salt) for record, salt in zip(records, salts)]


def make_commitment(records: list[dict]) -> tuple[dict, list[str]]:
    """The public commitment to `records` (in order) and the fresh secret salts it depends on:
    fresh per commitment, so the same fingerprints committed twice give unrelated roots."""
    if not isinstance(records, list) or not records:
        raise OMLError("a commitment needs a non-empty list of fingerprint records")
    salts = [secrets.token_bytes(SALT_BYTES).hex() for _ in records]
    root = merkle_root(_leaves(records, salts))
    public = {"version": VERSION, "hash": "sha256", "root": root.hex(), "count": len(records),
              "leaf_encoding": LEAF_ENCODING, "tree": "RFC 6962"}
    return public, salts


def write_commitment(run_dir: Path, records: list[dict], overwrite: bool = False, protocol: dict | None = None) -> dict:
    """Commit to `records` and write run_dir/commitment.json (public) and commitment_salts.json
    (private); `protocol` (oml.evidence.Protocol as a dict) records beside the root the test the owner
    will use, so that a verifier takes it from what was published before any check. An existing commitment is kept unless `overwrite`: once its root is published it
    must never change silently, or the reveals it was published for can no longer be checked.
    The salts are written first, so a public root never exists without the salts to open it."""
    run_dir = Path(run_dir)
    public_path, salts_path = run_dir / COMMITMENT_FILE, run_dir / SALTS_FILE
    if not overwrite:
        for path in (public_path, salts_path):
            if path.exists():
                raise OMLError(f"{path} already exists and a published commitment must never change; "
                               "pass --overwrite only if its root was never published")
    public, salts = make_commitment(records)
    if protocol is not None:
        public["protocol"] = protocol
    write_json_atomic(salts_path, {"version": VERSION, "root": public["root"], "salts": salts}, overwrite)
    try:
        write_json_atomic(public_path, public, overwrite)
    except OMLError:
        if not overwrite:  # our salts file was new (written exclusively) and now opens nothing
            salts_path.unlink(missing_ok=True)
        raise
    return public


def _check_public(public, path: Path) -> None:
    if not isinstance(public, dict):
        raise OMLError(f"commitment file {path} must hold a JSON object")
    if public.get("version") != VERSION or public.get("hash") != "sha256" or public.get("tree") != "RFC 6962":
        raise OMLError(f"commitment file {path} is not a version {VERSION} SHA-256 RFC 6962 commitment")
    if not (isinstance(public.get("root"), str) and _LOWER_HEX.fullmatch(public["root"])):
        raise OMLError(f"commitment file {path} has no root of 64 lowercase hex digits")
    if not _positive_int(public.get("count")):
        raise OMLError(f"commitment file {path} has no count >= 1")
    if not isinstance(public.get("leaf_encoding"), str):
        raise OMLError(f"commitment file {path} does not describe its leaf encoding")


def read_commitment(run_dir: Path) -> tuple[dict, list[str]]:
    """The run's public commitment and its salts, checked to belong together (same root, one salt
    per committed record), so a reveal is never built from salts that cannot open the published root."""
    run_dir = Path(run_dir)
    public_path, salts_path = run_dir / COMMITMENT_FILE, run_dir / SALTS_FILE
    public = read_json(public_path, "commitment file")
    _check_public(public, public_path)
    private = read_json(salts_path, "commitment salts file")
    if not (isinstance(private, dict) and isinstance(private.get("salts"), list)):
        raise OMLError(f"commitment salts file {salts_path} must hold an object with a list of salts")
    salts = private["salts"]
    for salt in salts:
        try:
            _check_salt(salt)
        except OMLError as error:
            raise OMLError(f"commitment salts file {salts_path}: {error}") from None
    if len(salts) != public["count"]:
        raise OMLError(f"{public_path} commits to {public['count']} records but {salts_path} holds {len(salts)} salts")
    if private.get("root") != public["root"]:
        raise OMLError(f"{salts_path} belongs to another commitment than {public_path} (the roots differ)")
    return public, salts


def revealed_records(run_dir_records: list[dict], salts: list[str], positions: list[int]) -> list[dict]:
    """For each asked position, what a third party needs to check it against the root: the record,
    its salt and its proof. Only those positions: every other key stays hidden behind its salt."""
    leaves = _leaves(run_dir_records, salts)
    if not isinstance(positions, list) or not positions:
        raise OMLError("name at least one position to reveal")
    for position in positions:
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(leaves):
            raise OMLError(f"position {position!r} is not in 0..{len(leaves) - 1}")
    if len(set(positions)) < len(positions):
        raise OMLError("a position to reveal is named more than once")
    return [{"position": i, "record": _record_fields(run_dir_records[i]), "salt": salts[i], "proof": inclusion_proof(leaves, i)}
            for i in positions]
