"""The docs are tested: every fenced shell command of README.md and docs/*.md is checked the way it can be without
running it, every relative link resolves, every page is reachable from the README and within its size, and the
worked "add a criterion" example of docs/criteria.md works.

How a command is checked (no Ray: ``ray.init`` is booby-trapped):
- ``python -m raysal.train|tune|heads``: the entry point's own checks up to the point where it would touch storage,
  model or data (`preflight`, replaced by a sentinel): the overrides compose against `configs/`, every value and the
  search space pass `spec_from_cfg` / `prepare_search`.
- ``python -m raysal.report``: its command line is accepted up to the report's build.
- ``python -m raysal.<other>`` (export, data tools, model tools) and ``python scripts/<x>.py``: the module's own
  argparse parser accepts the arguments (``[--opt]`` read as given).
- ``python -m pytest``: the paths exist and ``-m`` names registered markers.
- ``ray job submit … -- python …``: the submitted command, as above.
- anything else (``ray up``, ``pip``, ``wandb``, shell tools) cannot be checked here: its block must carry a marker
  ``<!-- commands: <reason> -->`` on the line before the fence. ``<!-- commands: expected to fail: … -->`` turns the
  check around: each raysal command of the block must be refused (the bad-input page's examples).
Every command's tokens that name a path in this repository (``search_spaces/…``, ``scripts/…``) must exist."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_ENTRIES = ("search_spaces/", "configs/", "scripts/", "docs/", "raysal/", "tests/", ".ci/", "cluster.yaml",
                "pyproject.toml", "README.md")  # fmt: skip
MARKER = r"(?:^<!--\s*commands:\s*(?P<marker>.*?)\s*-->\n)?"  # the line before a fence
FENCE = re.compile(MARKER + r"^[ \t]*```(?P<lang>[\w-]*)\n(?P<body>.*?)^[ \t]*```", re.S | re.M)
SHELL = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|"}
SHELL_SYNTAX = {"for", "done", "then", "fi", "else"}
README_MAX, PAGE_MAX = 12_288, 10_240


@dataclass(frozen=True)
class Command:
    page: str
    argv: tuple[str, ...]
    marker: str | None  # the block's marker, if any

    def __str__(self) -> str:
        return f"{self.page}: {' '.join(self.argv)}"


def fenced_blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, body, marker) of every fenced block of a page."""
    return [(m["lang"], m["body"], m["marker"]) for m in FENCE.finditer(page.read_text())]


def _segments(line: str) -> list[list[str]]:
    lex = shlex.shlex(re.sub(r"\[(-[^\]]*)\]", r"\1", line), posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in SEPARATORS:
            out.append([])
        else:
            out[-1].append(tok)
    segs = []
    for seg in out:
        if seg and seg[0] == "do":
            seg = seg[1:]
        if seg and seg[0] not in SHELL_SYNTAX:
            segs.append(seg)
    return segs


def commands() -> list[Command]:
    found = []
    for page in PAGES:
        rel = str(page.relative_to(ROOT))
        for lang, body, marker in fenced_blocks(page):
            if lang not in SHELL:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found += [Command(rel, tuple(seg), marker) for seg in _segments(line)]
    return found


class Checked(Exception):
    """Raised where a check stops: everything before it passed."""


def _repo_paths(argv: tuple[str, ...]) -> list[str]:
    names = []
    for tok in argv:
        for part in (tok, tok.split("=", 1)[-1]):
            if part.startswith(REPO_ENTRIES):
                names.append(part)
    return names


def python_target(argv: tuple[str, ...]) -> tuple[str, str, list[str]] | None:
    """``python -m mod args`` → ("module", mod, args); ``python scripts/x.py args`` → ("script", path, args)."""
    if not argv or argv[0] not in ("python", "python3"):
        return None
    if len(argv) > 2 and argv[1] == "-m":
        return "module", argv[2], list(argv[3:])
    if len(argv) > 1 and argv[1].endswith(".py"):
        return "script", argv[1], list(argv[2:])
    return None


def check(cmd: Command, monkeypatch: pytest.MonkeyPatch) -> str:
    """Check one command; returns how it was checked ("entry", "argparse", "pytest", "marked"). Raises on failure."""
    argv = cmd.argv
    if argv[:3] == ("ray", "job", "submit") and "--" in argv:
        inner = Command(cmd.page, argv[argv.index("--") + 1 :], cmd.marker)
        return check(inner, monkeypatch)
    target = python_target(argv)
    if target is None or target[:2] == ("module", "venv"):
        assert cmd.marker, f"{cmd}: not a command the docs test can check: mark its block <!-- commands: reason -->"
        return "marked"
    kind, name, args = target
    if kind == "module" and name.split(".")[0] not in ("raysal", "pytest") and cmd.marker:
        return "marked"  # another project's module (lmms_eval): its block says why it is not run here
    if kind == "module" and name == "pytest":
        if "-m" in args:
            expr = args[args.index("-m") + 1]
            registered = {m.split(":")[0].strip() for m in pytest_markers()}
            words = set(re.findall(r"[A-Za-z_]\w*", expr)) - {"not", "and", "or"}
            assert words <= registered, f"{cmd}: -m {expr!r} names unregistered markers {words - registered}"
        return "pytest"
    if kind == "module" and name in ("raysal.train", "raysal.tune", "raysal.heads", "raysal.report"):
        return _check_entry(name, args, monkeypatch)
    return _check_argparse(kind, name, args, monkeypatch)


def pytest_markers() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]


def _stop(*_a, **_k):
    raise Checked


def _check_entry(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    import raysal.orchestration.train.preflight as preflight_module
    from raysal.orchestration.train.compose import compose_cfg

    monkeypatch.setattr(preflight_module, "preflight", _stop)
    if name == "raysal.report":
        import raysal.report

        monkeypatch.setattr(raysal.report, "build_report", _stop)
        with pytest.raises(Checked):
            code = raysal.report.main(args)
            raise AssertionError(f"python -m raysal.report {' '.join(args)}: refused its arguments (exit {code})")
        return "entry"
    with pytest.raises(Checked):
        if name == "raysal.train":
            import raysal.train

            if "--cfg" in args:  # Hydra's flag: print the composed config; the rest must compose
                i = args.index("--cfg")
                args = args[:i] + args[i + 2 :]
            raysal.train.prepare(compose_cfg(args))
        elif name == "raysal.heads":
            from raysal.orchestration.train.head_finder import find_heads
            from raysal.orchestration.train.spec import spec_from_cfg

            find_heads(spec_from_cfg(compose_cfg(args)))
        else:
            import raysal.tune
            from raysal.orchestration.tune.prepare import prepare_search

            path, cli, _resume, database, _verbose = raysal.tune._parse_cli(args)
            prepare_search(path, cli, database)
    return "entry"


def _check_argparse(kind: str, name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    source = ROOT / name if kind == "script" else ROOT / (name.replace(".", "/") + ".py")
    assert source.exists(), f"{kind} {name}: no such file in the repository"
    assert "argparse" in source.read_text(), f"{name}: no argparse parser to check its arguments against"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        parse(self, a, namespace)
        raise Checked

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(source), *args])
    monkeypatch.syspath_prepend(str(source.parent))  # as `python scripts/x.py` has: its folder first on the path
    try:
        runpy.run_path(str(source), run_name="__main__")
    except Checked:
        return "argparse"
    except SystemExit as e:
        raise AssertionError(f"{name} {' '.join(args)}: its parser refused the arguments (exit {e.code})") from e
    raise AssertionError(f"{name}: ran without parsing its arguments")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ray

    def trap(*_a, **_k):
        raise AssertionError("a docs command check started Ray")

    monkeypatch.setattr(ray, "init", trap)
    monkeypatch.setenv("RAYSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYSAL_STORAGE", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)


def test_every_fenced_command_of_the_docs_is_checked(no_ray, monkeypatch, summary_lines):
    cmds = commands()
    counts: dict[str, int] = {}
    failures = []
    for cmd in cmds:
        for path in _repo_paths(cmd.argv):
            if not (ROOT / path).exists():
                failures.append(f"{cmd}: names {path}, which is not in the repository")
        expect_fail = bool(cmd.marker and cmd.marker.startswith("expected to fail"))
        with monkeypatch.context() as m:
            try:
                how = check(cmd, m)
            except Exception as e:  # every failure is reported with its command
                if expect_fail and python_target(cmd.argv):
                    how = "refused as expected"
                else:
                    failures.append(f"{cmd}: {type(e).__name__}: {str(e).strip()[:400]}")
                    continue
            else:
                if expect_fail and how != "marked":
                    failures.append(f"{cmd}: its block says it fails, but its check passed")
                    continue
        counts[how] = counts.get(how, 0) + 1
    summary = f"docs: {len(cmds)} fenced commands in {len(PAGES)} pages: " + ", ".join(
        f"{n} {how}" for how, n in sorted(counts.items())
    )
    print(summary)
    summary_lines.append(summary)
    assert not failures, "\n".join(failures)
    assert counts.get("entry", 0) >= 20, summary  # the docs show the entry points: a parser that finds none is broken


def test_the_command_parser_reads_continuations_options_and_chains():
    line = "python3 -m venv .venv && . .venv/bin/activate && python -m raysal.data.check /tmp/s [--json] # c"
    assert _segments(line) == [["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"],
                               ["python", "-m", "raysal.data.check", "/tmp/s", "--json"]]  # fmt: skip
    assert _segments("for m in a b; do accelerate launch x $m") == [["accelerate", "launch", "x", "$m"]]
    assert _segments("python -m raysal.train '~criterion@criteria.align'") == [
        ["python", "-m", "raysal.train", "~criterion@criteria.align"]
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ("python", "-m", "raysal.train", "trainer.max_stpes=10"),
        ("python", "-m", "raysal.tune", "search_spaces/nope.yaml"),
        ("python", "-m", "raysal.data.check"),  # its root argument is missing
        ("python", "-m", "raysal.report"),
        ("ray", "up", "cluster.yaml"),  # unmarked: cannot be checked
    ],
)
def test_a_broken_command_fails_its_check(no_ray, monkeypatch, argv):
    from hydra.errors import HydraException

    from raysal.orchestration.train.errors import ConfigError
    from raysal.search.space import SearchSpaceError

    refused = (AssertionError, HydraException, ConfigError, SearchSpaceError)  # the check's, or the entry point's own
    with pytest.raises(refused):
        check(Command("x.md", argv, None), monkeypatch)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces → hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


def test_no_relative_link_is_broken():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_within_its_size():
    readme = (ROOT / "README.md").read_text()
    linked = {t.partition("#")[0] for t in LINK.findall(readme)}
    assert len(readme.encode()) <= README_MAX, f"README.md is {len(readme.encode())} bytes (at most {README_MAX})"
    for page in PAGES[1:]:
        rel = str(page.relative_to(ROOT))
        assert rel in linked, f"{rel} is not linked from README.md"
        size = len(page.read_bytes())
        assert page.name == "benchmarks.md" or size <= PAGE_MAX, f"{rel} is {size} bytes (at most {PAGE_MAX})"


def test_every_page_starts_with_the_command_that_answers_it():
    for page in PAGES[1:]:
        text = page.read_text()
        first_block = FENCE.search(text)
        assert first_block and first_block["lang"] in SHELL, f"{page.name}: its first block is not a command"
        before = text[: first_block.start()].strip().splitlines()
        assert len(before) <= 2, f"{page.name}: the command comes after {len(before)} lines of text"


def _criteria_example() -> tuple[str, str]:
    blocks = fenced_blocks(ROOT / "docs" / "criteria.md")
    python = [b for lang, b, _ in blocks if lang == "python"]
    yaml = [b for lang, b, _ in blocks if lang == "yaml" and "_target_" in b]
    assert len(python) == 1 and len(yaml) == 1, "docs/criteria.md shows one criterion file and its YAML"
    return python[0], yaml[0]


def test_the_add_a_criterion_example_works(monkeypatch):
    """The page's two files, as a user would add them: the YAML instantiates the class, and the loss behaves like
    the shipped criteria (tests/test_criteria.py's inputs): finite, with gradients, lower on attention placed on
    the regions than on random attention, zero once the mass reaches the margin."""
    import dataclasses
    import types

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "tests"))
    from test_criteria import make_inputs, make_targets, perfect_attention, random_attention

    code, yaml_text = _criteria_example()
    module = types.ModuleType("raysal.criteria.mass_hinge")
    monkeypatch.setitem(sys.modules, "raysal.criteria.mass_hinge", module)
    exec(compile(code, "docs/criteria.md:mass_hinge.py", "exec"), module.__dict__)
    cfg = OmegaConf.create(yaml_text)
    crit = instantiate(cfg, layers=[2, 3])
    assert crit.name == "mass_hinge" and set(cfg) - {"_target_"} <= {f.name for f in dataclasses.fields(crit)}
    t = make_targets()
    att = random_attention()
    loss = crit(make_inputs(att, t))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert att.grad is not None and att.grad.abs().sum() > 0
    assert loss > 0
    # all of each token's attention inside its region: mass 1 ≥ margin, no loss
    assert crit(make_inputs(perfect_attention(t, binary=True), t)) == 0
