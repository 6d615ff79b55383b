"""docs/flags.md, the flag reference, is generated from the scripts' parsers and must match them."""
import importlib.util

from tests.conftest import ROOT


def generator():
    """scripts/make_flags_reference.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_flags_reference", ROOT / "scripts" / "make_flags_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_covers_every_script():
    assert sorted(generator().SCRIPTS) == sorted(path.name for path in ROOT.glob("*.py"))


def test_the_reference_is_up_to_date():
    make = generator()
    assert (ROOT / "docs" / "flags.md").read_text(encoding="utf-8") == make.reference(), \
        f"docs/flags.md is stale: regenerate it with `{make.COMMAND}`"
