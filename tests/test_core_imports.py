"""The house's rules, read from the code itself (docs/architecture.md draws the same floors):

- imports run down only: every module sits on a floor (`FLOORS`), and no import — at the top or inside a function —
  reaches a higher floor; no circle between files;
- the training core (every module below `raysal.search`, found by walking the packages, not by a list) loads
  neither Ray, Hydra nor W&B, except the stated `RAY_IN_CORE` modules (Ray Data's reader);
- criteria and the loop take batches from the data path: they import nothing from `raysal.preprocess`;
- no module over 400 lines; no function in `raysal/orchestration/` over 60 lines.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import raysal

ROOT = Path(raysal.__file__).parent

# lowest first: a module may import modules on its own floor or below. The ground floor holds what every room
# uses (storage, ranks, the batch contract); the core ends with `raysal.demo`; `raysal.search` is Ray-free.
FLOORS = [
    ("raysal", "raysal.storage", "raysal.distributed", "raysal.batch"),
    ("raysal.metrics",),
    ("raysal.data",),
    ("raysal.preprocess",),
    ("raysal.model",),
    ("raysal.attention",),
    ("raysal.criteria",),
    ("raysal.probes",),
    ("raysal.loop",),
    ("raysal.demo",),
    ("raysal.search",),
    ("raysal.orchestration", "raysal.orchestration.train"),
    ("raysal.orchestration.tune",),
    ("raysal.train", "raysal.tune", "raysal.heads", "raysal.report", "raysal.export"),
]
CORE_TOP = FLOORS.index(("raysal.demo",))  # floors 0..CORE_TOP: plain PyTorch/transformers/peft
# Ray Data's reader of the shards (a Ray Dataset is what Train workers iterate) and the demo data's check that
# reads through it; both are imported only by orchestration and tests
RAY_IN_CORE = {"raysal.data.ray_dataset", "raysal.data.demo"}
FORBIDDEN_IN_CORE = ("ray", "hydra", "omegaconf", "wandb")


def modules() -> dict[str, Path]:
    out = {"raysal": ROOT / "__init__.py"}
    for m in pkgutil.walk_packages(raysal.__path__, "raysal."):
        path = ROOT.joinpath(*m.name.split(".")[1:])
        out[m.name] = path / "__init__.py" if m.ispkg else path.with_suffix(".py")
    return out


def floor(module: str) -> int:
    """The floor of the longest room name that contains ``module``."""
    best, level = "", -1
    for i, rooms in enumerate(FLOORS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and len(room) > len(best):
                best, level = room, i
    assert level >= 0, f"{module}: on no floor of FLOORS (add its room there and to docs/architecture.md)"
    return level


def imports(module: str, path: Path) -> set[str]:
    """Every module name ``path`` imports, at the top or inside functions (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            out |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return out


def test_every_module_is_on_a_floor_and_imports_run_down_only():
    mods = modules()
    upward = []
    for name, path in mods.items():
        for target in imports(name, path) & mods.keys():
            if floor(target) > floor(name):
                upward.append(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
    assert upward == [], "\n".join(upward)


def test_no_circle_between_files():
    mods = modules()
    graph = {n: (imports(n, p) & mods.keys()) - {n} for n, p in mods.items()}
    graph = {n: {t for t in ts if not (t == "raysal" or n.startswith(t + "."))} for n, ts in graph.items()}  # parents
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                return [*path[path.index(t) :], t] if t in path else [n, t]
            if t not in state and (cycle := visit(t, [*path, t])):
                return cycle
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n, [n])
            assert cycle is None, " -> ".join(cycle)


def test_the_core_names_no_ray_hydra_or_wandb_but_the_stated_exceptions():
    """Static: no such import anywhere in a core module's text (inside functions too)."""
    offenders = []
    for name, path in modules().items():
        if floor(name) > CORE_TOP or name in RAY_IN_CORE:
            continue
        bad = {i.split(".")[0] for i in imports(name, path)} & set(FORBIDDEN_IN_CORE)
        if bad:
            offenders.append(f"{name}: {sorted(bad)}")
    assert offenders == [], offenders


def test_importing_the_core_loads_no_ray_hydra_or_wandb():
    """At run time: importing every core module (found by walking the packages) loads none of them."""
    core = sorted(n for n in modules() if floor(n) <= CORE_TOP and n not in RAY_IN_CORE)
    assert len(core) > 50 and "raysal.loop.fit" in core and "raysal.demo.base" in core
    code = "import sys\n" + "".join(f"import {m}\n" for m in core)
    code += f"print(sorted(set({FORBIDDEN_IN_CORE!r}) & {{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_loss_and_the_loop_take_batches_from_the_data_path():
    """Encoding (tokens, coverage, collation) is the data path's: criteria and the loop receive batches, and never
    re-encode samples themselves (the probes' and readout's inputs are encoded once, where their sets are chosen)."""
    offenders = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if name.startswith(("raysal.criteria", "raysal.loop"))
        for target in sorted(imports(name, path))
        if target.startswith("raysal.preprocess")
    ]
    assert offenders == [], offenders


def test_the_search_logic_is_ray_free():
    offenders = [
        f"{name}: {sorted(bad)}"
        for name, path in modules().items()
        if name.startswith("raysal.search")
        for bad in [{i.split(".")[0] for i in imports(name, path)} & {"ray", "wandb"}]
        if bad
    ]
    assert offenders == [], offenders


def test_modules_and_orchestration_functions_stay_small():
    long_modules = [f"{p.relative_to(ROOT)}: {n} lines" for p in ROOT.rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > 400]  # fmt: skip
    long_functions = [
        f"{p.relative_to(ROOT)}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines"
        for p in (ROOT / "orchestration").rglob("*.py")
        for f in ast.walk(ast.parse(p.read_text()))
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.end_lineno - f.lineno + 1 > 60
    ]
    assert long_modules == [] and long_functions == [], long_modules + long_functions


def test_the_rules_catch_what_they_guard(tmp_path):
    """The checks above can fail: an upward import and a circle are found in a made-up pair of modules."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from raysal.orchestration.train.spec import RunSpec\n")
    b.write_text("def f():\n    import raysal.loop.fit\n")
    assert "raysal.orchestration.train.spec" in imports("raysal.loop.x", a)
    assert floor("raysal.orchestration.train.spec") > floor("raysal.loop.x")
    assert "raysal.loop.fit" in imports("raysal.model.y", b) and floor("raysal.loop.fit") > floor("raysal.model.y")
    assert floor("raysal.orchestration.tune.driver") > floor("raysal.orchestration.train.worker")
