import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has a Quick start bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert len(commands) == 2
    install_and_test = commands[1].split("&& ", 2)[-1]  # after venv creation + activation
    assert install_and_test in (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]
