"""The training package keeps the shape issue 14 gave it: `run()` on one screen, short parameter lists
called with keywords, and a loop that knows no task (tasks plug in through `pipeline.tasks.base`)."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "pipeline" / "training"


def functions(path: Path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]


def test_run_fits_on_one_screen():
    (run,) = [f for f in functions(TRAIN / "loop.py") if f.name == "run"]
    assert run.end_lineno - run.lineno + 1 <= 40


def test_no_function_in_train_takes_more_than_5_positional_parameters():
    wide = [
        f"{path.name}:{f.name}"
        for path in TRAIN.glob("*.py")
        for f in functions(path)
        if len([a for a in f.args.posonlyargs + f.args.args if a.arg not in ("self", "cls")]) > 5
    ]
    assert wide == []


def test_the_loop_imports_no_task_module():
    imported = set()
    for path in TRAIN.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    task_modules = {m for m in imported if m.startswith("pipeline.tasks.") and m != "pipeline.tasks.base"}
    assert {m.rsplit(".", 1)[0] for m in task_modules} <= {"pipeline.tasks.base"}, task_modules
