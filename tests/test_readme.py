"""The README's fenced blocks, run as a new user copies them: every block runs, or carries a marker
`<!-- readme-test: skip: REASON -->` on the line before it; an unmarked block that fails fails here.

Blocks run in order in one empty folder (later blocks use what "A first session" made): shell blocks
with bash -e and the venv's `dinofeat` on PATH; Python blocks with this interpreter, against a real
`dinofeat serve` whose address replaces the README's "localhost:50051"; TOML blocks through the
server's configuration reader, whose [limits] must equal the defaults they show. Offline, the deep
sets use a tiny random-weight DINOv2 of the real architecture ($DINOFEAT_WEIGHTS)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess

README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip: (\S.*?) -->")
FENCE = re.compile(r"^( *)```(\w*)\s*$")
ADDRESS = "localhost:50051"


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"line {self.line} ({self.language or 'shell'})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, its language, its text (indent removed) and its skip reason if marked."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language, start = len(opening.group(1)), opening.group(2), i
        i += 1
        while not lines[i].strip().startswith("```"):
            i += 1
        marker = SKIP.search(lines[start - 1]) if start else None
        body = "\n".join(line[indent:] for line in lines[start + 1 : i])
        blocks.append(Block(start + 1, language, body + "\n", marker.group(1) if marker else None))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks_and_every_skip_says_why():
    assert [b.name for b in BLOCKS if b.skip is None], "no README block runs"
    assert all(len(b.skip) > 20 for b in BLOCKS if b.skip is not None)


@pytest.fixture(scope="module")
def walk(tmp_path_factory, tiny_weights):
    """The folder the blocks run in, the environment they see, and a server for the Python blocks."""
    folder = tmp_path_factory.mktemp("readme")
    server = ServerProcess("--weights", f"dinov2_vits14={tiny_weights}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DINOFEAT_WEIGHTS": str(tiny_weights), "PYTHONUNBUFFERED": "1"}
    yield folder, env, server.address
    server.stop()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip is None], ids=lambda b: b.name)
def test_readme_block_runs_as_written(block, walk):
    folder, env, address = walk
    if block.language == "toml":
        from dinofeat_server.service.config import ServerLimits, read_config

        (folder / "config.toml").write_text(block.text)
        _, limits = read_config(folder / "config.toml")
        assert limits == ServerLimits(), "the README's [limits] must show the defaults"
        return
    if block.language == "python":
        command = [sys.executable, "-c", block.text.replace(ADDRESS, address)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README {block.name} failed:\n{block.text}\n{result.stdout}\n{result.stderr}"


# Commands the READMEs show but do not run as blocks (the synopsis, inline `dinofeat ...` spans): each must
# name a real command, options that command has, and values its choices (and the feature sets) accept.
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)(?:[ =]([^\s\[\]]+))?")
DOCUMENTS = (README, ROOT / "fiji_macros" / "README.md")


def documented_commands(text: str) -> list[str]:
    """Every inline `dinofeat ...` span, and every line of a fenced block that starts with `dinofeat `
    (with its continuation lines: "[..." or after a trailing backslash; comments removed)."""
    inline = [" ".join(span.split()) for span in re.findall(r"`(dinofeat [^`]+)`", text)]
    shown: list[list[str]] = []
    for block in readme_blocks(text):
        continuing = False
        for line in block.text.splitlines():
            words = line.split("  #", 1)[0].strip()
            if words.startswith("dinofeat "):
                shown.append([words])
            elif continuing and (words.startswith("[") or shown[-1][-1].endswith("\\")):
                shown[-1].append(words)
            else:
                continuing = False
                continue
            continuing = True
    return inline + [" ".join(part.rstrip("\\ ") for part in parts) for parts in shown]


@functools.cache
def dinofeat_parser():
    from dinofeat_client.cli import build_parser

    return build_parser()


def command_parser(words: list[str]):
    """The argparse parser of `dinofeat WORDS...` (a subcommand, or fiji's train/apply), and the words left."""
    import argparse

    parser = dinofeat_parser()
    while words:
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = words[0].split("|")[0]
        if not subcommands or name not in subcommands[0].choices:
            break
        parser, words = subcommands[0].choices[name], words[1:]
    return parser, words


@pytest.mark.parametrize("command", [c for d in DOCUMENTS for c in documented_commands(d.read_text(encoding="utf-8"))])
def test_every_documented_command_names_options_and_values_that_exist(command):
    from dinofeat.contract.feature_sets import SETS

    parser, rest = command_parser(command.split()[1:])
    assert parser.prog != "dinofeat", f"{command!r}: no such dinofeat command"
    for option, value in OPTION.findall(" ".join(rest)):
        action = parser._option_string_actions.get(option)
        assert action is not None, f"{command!r}: `{parser.prog}` has no option {option}"
        placeholder = not value or value.isupper() or value == "..."  # IMAGE, K, "[--set ...]"
        alternatives = [] if placeholder else [v.strip("'\"") for v in value.split("|")]
        if action.choices is not None and not isinstance(action.choices, range):
            assert all(v in action.choices for v in alternatives), f"{command!r}: {option} takes {sorted(action.choices)}"
        if option == "--set":
            assert all(v in {s.name for s in SETS} for v in alternatives), f"{command!r}: no such feature set"
