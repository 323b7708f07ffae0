"""A stranger's install: README's quick start is two commands, CI runs the second verbatim, the tool chain is pinned."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no Quick start code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_quick_start_is_two_commands_and_ci_runs_the_test_one_verbatim():
    commands = quick_start()
    assert len(commands) == 2 and "engine.demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "venv" in ci  # a fresh virtualenv of its own, never the machine's Python


def test_test_tool_chain_is_pinned_and_library_requirements_are_ranges():
    assert "-c constraints-dev.txt" in quick_start()[1]
    pins = {}
    for line in (ROOT / "constraints-dev.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints-dev.txt: {line!r} is not an exact pin"
            pins[requirement_name(name)] = version
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    dev = [line for line in setup["options.extras_require"]["dev"].splitlines() if line.strip()]
    assert {requirement_name(line) for line in dev} <= set(pins), "every dev tool must be pinned"
    runtime = [line for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    assert not [line for line in runtime if "==" in line.split(";")[0]], "the library's own requirements keep ranges"
