"""Write docs/flags.md: every flag of every script, from the scripts' own parsers.

    python scripts/make_flags_reference.py

Each script at the repository root builds its parser in `build_parser()` (from the typed
settings it takes and the shared flags of oml.cli), so the reference says exactly what
--help says: a section per script, a row per flag with its default and what it does.
tests/test_flags_reference.py fails when the file is out of date.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "flags.md"
# In the order a user meets them: make fingerprints, train them in, check a suspect, prove it, measure.
SCRIPTS = ["generate_finetuning_data.py", "finetune_multigpu.py", "check_fingerprints.py", "commit_fingerprints.py",
           "verify_evidence.py", "evaluate_utility.py", "evaluate_persistence.py", "evaluate_robustness.py",
           "evaluate_false_positives.py", "evaluate_stealth.py"]
COMMAND = "python scripts/make_flags_reference.py"
sys.path.insert(0, str(ROOT))  # the scripts import oml from the repository root


def script_parser(script: str) -> argparse.ArgumentParser:
    """The script's parser, from its build_parser(), without running the script."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def default_text(action: argparse.Action) -> str:
    """The default as a user would type or read it."""
    if action.required or not action.option_strings:
        return "required"
    if action.nargs == 0:  # a switch
        return "on" if action.default else "off"
    if action.default is None:
        return "none"
    values = action.default if isinstance(action.default, (list, tuple)) else [action.default]
    return code(*values) if values else "empty"


def code(*values) -> str:
    """Values as typed on the command line, in code style ('' for the empty string)."""
    return "`" + " ".join(str(value) if value != "" else "''" for value in values) + "`"


def description(action: argparse.Action, script: str) -> str:
    """The flag's help as --help prints it (%-placeholders filled in), with its choices."""
    text = (action.help or "") % {**vars(action), "prog": script}
    if action.choices is not None:
        text += f" One of: {', '.join(code(choice) for choice in action.choices)}."
    return text


def cell(text: str) -> str:
    """Help text as it reads, inside one cell of a Markdown table (no emphasis, no HTML tags)."""
    for special in "\\|*<>":
        text = text.replace(special, "\\" + special)
    return text.replace("\n", " ")


def flag_names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest}` (positional)"
    return ", ".join(f"`{name}`" for name in action.option_strings)


def section(script: str) -> str:
    """One script: its summary line and a table of its flags."""
    parser = script_parser(script)
    summary = (parser.description or "").strip().splitlines()[0]
    rows = [f"| {flag_names(a)} | {default_text(a)} | {cell(description(a, script))} |"
            for a in parser._actions if a.dest != "help"]
    return "\n".join([f"## {script}", "", summary, "", "| flag | default | what it does |", "| --- | --- | --- |", *rows, ""])


def reference() -> str:
    """The whole of docs/flags.md."""
    header = ["# Flags", "", f"Every flag of every script, generated from the scripts' parsers by `{COMMAND}`: "
              "do not edit by hand. `python SCRIPT --help` prints the same. A default of `none` means the flag is off or "
              "its input not given; where the text says `default: ...`, the default is decided at run time as it says.",
              ""]
    return "\n".join(header + [section(script) for script in SCRIPTS])


def main() -> None:
    OUTPUT.write_text(reference(), encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
