"""The floors of docs/architecture.md hold: no import points up a floor, none crosses between train and eval, and no
module imports itself through others. Every import counts, those inside functions too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A package may import from the floors below it, never from its own floor's other package or from above.
FLOORS = {"vision_backbones": 0, "vlm": 1, "data": 2, "train": 3, "eval": 3, "benchmarks": 4, "demo": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in FLOORS for path in (ROOT / package).rglob("*.py")}


def imported(path: Path, name: str, known: dict[str, Path]) -> list[tuple[str, int]]:
    """The suite's modules that `path` (module `name`) imports, with line numbers. `from package import name`
    counts as importing the submodule when `name` is one, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found += [(target, node.lineno) for target in targets if target.split(".")[0] in FLOORS]
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imported(path, name, known) for name, path in known.items()}


def test_no_import_points_up_a_floor_or_across_train_and_eval():
    wrong = []
    for source, targets in import_graph().items():
        here = source.split(".")[0]
        for target, line in targets:
            there = target.split(".")[0]
            if FLOORS[there] > FLOORS[here] or (there != here and FLOORS[there] == FLOORS[here]):
                wrong.append(f"{source} (line {line}) imports {target}")
    assert not wrong, "imports against the floors of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = {source: sorted({target for target, _ in targets if target != source})
             for source, targets in import_graph().items()}
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for target in graph.get(node, []):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
