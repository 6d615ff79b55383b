"""The Merkle commitment: every proof verifies, every tampering fails, and the root hides unrevealed keys."""
import hashlib
import json

import pytest

from oml import OMLError
from oml.commitment import (KEY_FORMATS, LEAF_ENCODING, committed_record, inclusion_proof, leaf_hash, make_commitment,
                            merkle_root, read_commitment, revealed_records, verify_inclusion, verify_revealed,
                            write_commitment)


def records(n: int) -> list[dict]:
    return [committed_record({"key": f"secret key {i} ✓", "response": f"response {i}"}, "both", 16, 1) for i in range(n)]


def salts_for(n: int) -> list[str]:
    return [hashlib.sha256(f"salt {i}".encode()).hexdigest() for i in range(n)]  # fixed, so failures reproduce


def leaves(n: int) -> list[bytes]:
    return [leaf_hash(r, s) for r, s in zip(records(n), salts_for(n))]


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


@pytest.mark.parametrize("count", [*range(1, 18), 100])
def test_every_proof_verifies(count):
    tree = leaves(count)
    root = merkle_root(tree).hex()
    for index in range(count):
        proof = inclusion_proof(tree, index)
        assert len(proof) <= (count - 1).bit_length()
        assert verify_inclusion(tree[index], index, count, proof, root)
        assert verify_inclusion(tree[index], index, count, proof, root.upper())  # hex case is not part of a hash


def test_tree_shape_is_rfc_6962():
    a, b, c, d, e, f, g = leaves(7)
    assert merkle_root([a]) == a
    assert merkle_root([a, b, c]) == node(node(a, b), c)
    assert merkle_root([a, b, c, d, e]) == node(node(node(a, b), node(c, d)), e)
    assert merkle_root([a, b, c, d, e, f, g]) == node(node(node(a, b), node(c, d)), node(node(e, f), g))
    assert inclusion_proof([a, b, c, d, e, f, g], 4) == [f.hex(), g.hex(), node(node(a, b), node(c, d)).hex()]
    assert inclusion_proof([a, b, c, d, e, f, g], 6) == [node(e, f).hex(), node(node(a, b), node(c, d)).hex()]


def test_leaf_encoding_is_as_documented():
    record = committed_record({"key": "clé \"quoted\" 鍵", "response": "ответ", "probability": 0.2}, "chat", 12, 3)
    assert record == {"key": "clé \"quoted\" 鍵", "response": "ответ", "key_format": "chat", "key_length": 12, "response_length": 3}
    salt = "ab" * 32
    text = ('{"key":"clé \\"quoted\\" 鍵","key_format":"chat","key_length":12,"response":"ответ",'
            f'"response_length":3,"salt":"{salt}"}}')
    assert leaf_hash(record, salt) == hashlib.sha256(b"\x00" + text.encode("utf-8")).digest()
    assert "SHA-256(0x00 || encoding)" in LEAF_ENCODING and "RFC 6962" in LEAF_ENCODING


def test_key_formats_match_the_training_choices():
    from oml.tokenization import FORMAT_CHOICES
    assert KEY_FORMATS == FORMAT_CHOICES


COUNT = 10
PUBLIC, SALTS = make_commitment(records(COUNT))
REVEALED = revealed_records(records(COUNT), SALTS, list(range(COUNT)))


def altered(entry: dict, **changes) -> dict:
    return {**entry, "record": {**entry["record"], **changes}}


def flip(hex_text: str) -> str:
    return ("0" if hex_text[0] != "0" else "1") + hex_text[1:]


TAMPERINGS = {
    "response": lambda e: altered(e, response=e["record"]["response"] + "!"),
    "key": lambda e: altered(e, key=e["record"]["key"].replace("secret", "Secret")),
    "key_format": lambda e: altered(e, key_format="raw"),
    "key_length": lambda e: altered(e, key_length=e["record"]["key_length"] + 1),
    "response_length": lambda e: altered(e, response_length=2),
    "salt": lambda e: {**e, "salt": flip(e["salt"])},
    "salt case": lambda e: {**e, "salt": e["salt"].upper()},
    "index": lambda e: {**e, "position": (e["position"] + 1) % COUNT},
    "sibling": lambda e: {**e, "proof": [*e["proof"][:-1], flip(e["proof"][-1])]},
    "truncated proof": lambda e: {**e, "proof": e["proof"][:-1]},
    "extended proof": lambda e: {**e, "proof": [*e["proof"], e["proof"][0]]},
    "empty proof": lambda e: {**e, "proof": []},
    "garbage sibling": lambda e: {**e, "proof": ["zz" * 32, *e["proof"][1:]]},
    "short sibling": lambda e: {**e, "proof": [e["proof"][0][:-1], *e["proof"][1:]]},
    "sibling with spaces": lambda e: {**e, "proof": [" ".join(e["proof"][0][i:i + 2] for i in range(0, 64, 2)), *e["proof"][1:]]},
    "sibling not a string": lambda e: {**e, "proof": [bytes.fromhex(e["proof"][0]), *e["proof"][1:]]},
    "proof not a list": lambda e: {**e, "proof": "".join(e["proof"])},
    "record missing": lambda e: {**e, "record": None},
}


@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_every_tampering_fails(tamper):
    for entry in REVEALED:
        assert verify_revealed(entry, COUNT, PUBLIC["root"])
        assert not verify_revealed(TAMPERINGS[tamper](entry), COUNT, PUBLIC["root"]), (tamper, entry["position"])


@pytest.mark.parametrize("index", [-1, COUNT, COUNT + 5, True, 1.0, "0", None])
def test_a_wrong_index_fails(index):
    entry = REVEALED[1]
    leaf = leaf_hash(entry["record"], entry["salt"])
    assert verify_inclusion(leaf, 1, COUNT, entry["proof"], PUBLIC["root"])
    assert not verify_inclusion(leaf, index, COUNT, entry["proof"], PUBLIC["root"])


def test_a_wrong_count_fails():
    last = REVEALED[-1]
    for count in [*range(-1, COUNT), *range(COUNT + 1, 4 * COUNT), True, 10.0, "10", None]:
        assert not verify_revealed(last, count, PUBLIC["root"]), count
    for entry in REVEALED:  # any other count fails unless its tree gives the leaf the very same path (see below)
        for count in range(1, 4 * COUNT):
            same_path = path_shape(entry["position"], count) == path_shape(entry["position"], COUNT)
            assert verify_revealed(entry, count, PUBLIC["root"]) == same_path, (entry["position"], count)
        assert not verify_revealed(entry, entry["position"], PUBLIC["root"])


def path_shape(index: int, count: int) -> list[bool] | None:
    """Bottom-up, whether each sibling on the audit path lies to the right, from the RFC 6962
    recursion itself (not the bit arithmetic the verifier uses); None if the index is out of range."""
    if not 0 <= index < count:
        return None
    if count == 1:
        return []
    k = 1 << ((count - 1).bit_length() - 1)
    return path_shape(index, k) + [True] if index < k else path_shape(index - k, count - k) + [False]


def test_the_count_is_published_beside_the_root():
    # RFC 6962 checks a proof against a root and a tree size it is given: leaf 0 of a 3-leaf tree also
    # passes as leaf 0 of a 4-leaf tree with the same root (whose right half would be the third leaf).
    # So the count is part of what is published, and verifiers take it from commitment.json.
    a, b, c = leaves(3)
    assert verify_inclusion(a, 0, 4, inclusion_proof([a, b, c], 0), merkle_root([a, b, c]).hex())
    assert {"root", "count"} <= set(PUBLIC) and PUBLIC["count"] == COUNT


@pytest.mark.parametrize("root", ["", "zz" * 32, PUBLIC["root"][:-2], PUBLIC["root"] + "00", flip(PUBLIC["root"]), None, 7,
                                  bytes.fromhex(PUBLIC["root"])])
def test_a_wrong_or_malformed_root_fails(root):
    assert not verify_revealed(REVEALED[3], COUNT, root)


@pytest.mark.parametrize("leaf", [b"", b"\x00" * 31, b"\x00" * 33, "00" * 32, None])
def test_a_malformed_leaf_fails(leaf):
    assert not verify_inclusion(leaf, 3, COUNT, REVEALED[3]["proof"], PUBLIC["root"])


def test_fresh_salts_give_unrelated_roots():
    first, first_salts = make_commitment(records(COUNT))
    second, second_salts = make_commitment(records(COUNT))
    assert first["root"] != second["root"] and not set(first_salts) & set(second_salts)
    assert all(len(bytes.fromhex(salt)) == 32 for salt in first_salts)
    assert first == {"version": 1, "hash": "sha256", "root": first["root"], "count": COUNT,
                     "leaf_encoding": LEAF_ENCODING, "tree": "RFC 6962"}


def test_a_leaf_never_passes_as_an_inner_node():
    a, b = leaves(2)
    root = merkle_root([a, b])
    assert root == node(a, b)
    concatenation_leaf = hashlib.sha256(b"\x00" + a + b).digest()  # a 1-leaf tree over the bytes a || b
    assert merkle_root([concatenation_leaf]) != root
    assert not verify_inclusion(concatenation_leaf, 0, 1, [], root.hex())
    assert verify_inclusion(a, 0, 2, [b.hex()], root.hex())


def test_revealed_records_hold_only_the_asked_positions():
    fingerprints = records(COUNT)
    entries = revealed_records(fingerprints, SALTS, [7, 2])
    assert [e["position"] for e in entries] == [7, 2]
    assert [set(e) for e in entries] == [{"position", "record", "salt", "proof"}] * 2
    text = json.dumps(entries, ensure_ascii=False)
    hidden = [i for i in range(COUNT) if i not in (7, 2)]
    assert not any(fingerprints[i]["key"] in text or SALTS[i] in text for i in hidden)
    assert all(verify_revealed(e, COUNT, PUBLIC["root"]) for e in entries)


@pytest.mark.parametrize("positions", [[], [COUNT], [-1], [1, 1], [True], "1"])
def test_bad_positions_are_refused(positions):
    with pytest.raises(OMLError):
        revealed_records(records(COUNT), SALTS, positions)


@pytest.mark.parametrize("fingerprint, key_format, key_length, response_length", [
    ({"key": "k"}, "raw", 16, 1), ({"key": 1, "response": "r"}, "raw", 16, 1), ("k", "raw", 16, 1),
    ({"key": "k", "response": "r"}, "chat_template", 16, 1), ({"key": "k", "response": "r"}, "raw", 0, 1),
    ({"key": "k", "response": "r"}, "raw", 16, True), ({"key": "k", "response": "r"}, "raw", "16", 1)])
def test_malformed_records_are_one_line_errors(fingerprint, key_format, key_length, response_length):
    with pytest.raises(OMLError, match=r"^[^\n]+$"):
        committed_record(fingerprint, key_format, key_length, response_length)


@pytest.mark.parametrize("salt", ["ab" * 31, "AB" * 32, "zz" * 32, None, b"\x00" * 32])
def test_malformed_salts_are_refused(salt):
    with pytest.raises(OMLError):
        leaf_hash(records(1)[0], salt)


def test_malformed_trees_are_refused():
    for bad in ([], [b"short"], "ab" * 32, None):
        with pytest.raises(OMLError):
            merkle_root(bad)
    with pytest.raises(OMLError):
        inclusion_proof(leaves(3), 3)
    with pytest.raises(OMLError, match="lone surrogate"):
        leaf_hash({**records(1)[0], "key": "\ud800"}, "ab" * 32)


def test_write_and_read_a_commitment(tmp_path):
    public = write_commitment(tmp_path, records(COUNT))
    assert json.loads((tmp_path / "commitment.json").read_text()) == public
    assert "secret key" not in (tmp_path / "commitment.json").read_text()
    read_public, salts = read_commitment(tmp_path)
    assert read_public == public and len(salts) == COUNT
    tree = [leaf_hash(r, s) for r, s in zip(records(COUNT), salts)]
    assert merkle_root(tree).hex() == public["root"]
    for entry in revealed_records(records(COUNT), salts, [0, COUNT - 1]):
        assert verify_revealed(entry, public["count"], public["root"])


def test_a_commitment_is_never_replaced_silently(tmp_path):
    public = write_commitment(tmp_path, records(COUNT))
    before = {name: (tmp_path / name).read_text() for name in ("commitment.json", "commitment_salts.json")}
    with pytest.raises(OMLError, match="must never change"):
        write_commitment(tmp_path, records(COUNT))
    assert before == {name: (tmp_path / name).read_text() for name in before}
    replaced = write_commitment(tmp_path, records(COUNT), overwrite=True)
    assert replaced["root"] != public["root"] and read_commitment(tmp_path)[0] == replaced


def test_a_leftover_salts_file_also_blocks_a_new_commitment(tmp_path):
    (tmp_path / "commitment_salts.json").write_text("{}")
    with pytest.raises(OMLError, match="must never change"):
        write_commitment(tmp_path, records(2))
    assert not (tmp_path / "commitment.json").exists()


def test_read_commitment_rejects_mismatched_salts(tmp_path):
    write_commitment(tmp_path, records(COUNT))
    salts_path = tmp_path / "commitment_salts.json"
    private = json.loads(salts_path.read_text())
    salts_path.write_text(json.dumps({**private, "salts": private["salts"] + ["cd" * 32]}))
    with pytest.raises(OMLError, match="commits to 10 records but .* holds 11 salts"):
        read_commitment(tmp_path)
    salts_path.write_text(json.dumps({**private, "salts": private["salts"][:-1]}))
    with pytest.raises(OMLError, match="holds 9 salts"):
        read_commitment(tmp_path)
    other = tmp_path / "other"
    write_commitment(other, records(COUNT))
    salts_path.write_text((other / "commitment_salts.json").read_text())
    with pytest.raises(OMLError, match="another commitment"):
        read_commitment(tmp_path)
    salts_path.write_text(json.dumps({**private, "salts": ["nothex"] * COUNT}))
    with pytest.raises(OMLError, match="lowercase hex"):
        read_commitment(tmp_path)


@pytest.mark.parametrize("change", [{"root": "zz" * 32}, {"count": 0}, {"version": 2}, {"hash": "sha1"}, {"leaf_encoding": None}])
def test_read_commitment_rejects_a_malformed_public_file(tmp_path, change):
    public = write_commitment(tmp_path, records(3))
    (tmp_path / "commitment.json").write_text(json.dumps({**public, **change}))
    with pytest.raises(OMLError):
        read_commitment(tmp_path)


def test_read_commitment_reports_missing_files(tmp_path):
    with pytest.raises(OMLError, match="commitment file not found"):
        read_commitment(tmp_path)
    write_commitment(tmp_path, records(3))
    (tmp_path / "commitment_salts.json").unlink()
    with pytest.raises(OMLError, match="commitment salts file not found"):
        read_commitment(tmp_path)


def with_others(n: int) -> list[dict]:
    """Records whose odd keys accept two more responses (an even key has only its response)."""
    return [committed_record({"key": f"secret key {i}", "response": f" yes {i}",
                              **({"other_responses": [f" oui {i}", f" ja {i}"]} if i % 2 else {})}, "raw", 16, 2)
            for i in range(n)]


def test_other_responses_are_committed_and_verify():
    fingerprints = with_others(5)
    assert fingerprints[1]["other_responses"] == [" oui 1", " ja 1"] and "other_responses" not in fingerprints[0]
    public, salts = make_commitment(fingerprints)
    entries = revealed_records(fingerprints, salts, list(range(5)))
    assert entries[1]["record"]["other_responses"] == [" oui 1", " ja 1"] and "other_responses" not in entries[0]["record"]
    assert all(verify_revealed(e, 5, public["root"]) for e in entries)
    others = entries[1]
    for changed in ([" oui 1"], [" ja 1", " oui 1"], [" oui 1", " ja 1", " si 1"], [" oui 1", " nein 1"]):
        assert not verify_revealed(altered(others, other_responses=changed), 5, public["root"]), changed
    dropped = {**others, "record": {k: v for k, v in others["record"].items() if k != "other_responses"}}
    assert not verify_revealed(dropped, 5, public["root"])
    assert not verify_revealed(altered(entries[0], other_responses=[" anything"]), 5, public["root"])  # cannot be added later


def test_a_record_without_other_responses_hashes_as_before_they_existed():
    salt = "cd" * 32
    old_encoding = ('{"key":"k ✓","key_format":"raw","key_length":4,"response":" r","response_length":1,'
                    f'"salt":"{salt}"}}')  # the five-field leaf every earlier commitment holds
    old_leaf = hashlib.sha256(b"\x00" + old_encoding.encode("utf-8")).digest()
    assert leaf_hash(committed_record({"key": "k ✓", "response": " r"}, "raw", 4, 1), salt) == old_leaf
    assert leaf_hash(committed_record({"key": "k ✓", "response": " r", "other_responses": []}, "raw", 4, 1), salt) == old_leaf
    record = committed_record({"key": "k ✓", "response": " r", "other_responses": [" s", " t"]}, "raw", 4, 1)
    new_encoding = ('{"key":"k ✓","key_format":"raw","key_length":4,"other_responses":[" s"," t"],"response":" r",'
                    f'"response_length":1,"salt":"{salt}"}}')
    assert leaf_hash(record, salt) == hashlib.sha256(b"\x00" + new_encoding.encode("utf-8")).digest()
    assert "other_responses" in LEAF_ENCODING


@pytest.mark.parametrize("others, problem", [
    (" s", "list of strings"), ([" s", 3], "list of strings"), (None, "list of strings"), ({" s": 1}, "list of strings"),
    ([" s", " s"], "differ from each other"), ([" r"], "from its response"), ([" s", " r"], "from its response"),
    ([""], "empty or blank"), ([" s", " \n"], "empty or blank")])
def test_malformed_other_responses_are_one_line_errors(others, problem):
    with pytest.raises(OMLError, match=rf"^[^\n]*{problem}[^\n]*$"):
        committed_record({"key": "k", "response": " r", "other_responses": others}, "raw", 16, 1)
    with pytest.raises(OMLError, match=problem):
        leaf_hash({**records(1)[0], "response": " r", "other_responses": others}, "ab" * 32)
