"""`task.name` as an import path to a user's pipeline.Task subclass: resolved and checked before any
worker starts, every mistake a ConfigError naming the key (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline import imports, tasks
from pipeline.config import ConfigError
from pipeline.tasks.base import Task

USERPKG = Path(__file__).resolve().parents[1] / "userpkg"


@pytest.fixture(autouse=True)
def userpkg_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(USERPKG))
    yield
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


def test_a_user_task_by_module_path_and_by_file_path():
    by_module = tasks.build("userpkg.tasks:SmoothClassify", {"label_smoothing": 0.2})
    assert isinstance(by_module, Task) and by_module.label_smoothing == 0.2
    by_file = tasks.build(f"{USERPKG}/userpkg/tasks.py:CoDistill", {"temperature": 3.0})
    assert by_file.ENGINES == ("teacher", "student") and by_file.temperature == 3.0
    # the directories a worker must put on sys.path to import them as the driver did
    roots = imports.module_roots(["userpkg.tasks:SmoothClassify", f"{USERPKG}/userpkg/tasks.py:CoDistill"])
    assert roots == [str(USERPKG)]  # a file is loaded by its path: its directory stays off sys.path


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("nopkg.tasks:Task", {}, r"'task.name': cannot import module 'nopkg.tasks'.*PYTHONPATH"),
        ("userpkg.tasks:Nothing", {}, r"'task.name': 'userpkg.tasks' has no 'Nothing'.*SmoothClassify"),
        (
            "userpkg.models:TinyNet",
            {},
            r"'task.name': 'userpkg.models:TinyNet' is a class, but not a subclass of pipeline.Task",
        ),
        ("userpkg.tasks:NoEval", {}, r"'task.name'.*does not define eval_sums, eval_metrics"),
        ("missing/file.py:Task", {}, r"'task.name': file missing/file.py does not exist"),
        ("userpkg.tasks:", {}, r"'task.name': 'userpkg.tasks:' is not an import path"),
        (
            "userpkg.tasks:SmoothClassify",
            {"label_smothing": 0.1},
            r"'task.args.label_smothing'.*did you mean 'task.args.label_smoothing'",
        ),
        (
            "userpkg.tasks:SmoothClassify",
            {"label_smoothing": 2.0},
            r"'task.args': label_smoothing must be in \[0, 1\)",
        ),
        ("clasify", {}, r"unknown task 'clasify'; did you mean 'classify'\?.*'package.module:Class'"),
        ("next_step", {"top_k": 1}, r"'task.args.top_k' for task 'next_step'; valid: none"),
    ],
)
def test_user_task_mistakes_name_the_key(name, args, message):
    with pytest.raises(ConfigError, match=message):
        tasks.build(name, args)


def test_a_module_that_fails_to_import_is_reported_with_its_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import pipeline\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(
        ConfigError, match=r"'task.name': importing .*broken.py failed: RuntimeError: no GPU here"
    ):
        tasks.build(f"{broken}:Task", {})
    importer = tmp_path / "importer.py"
    importer.write_text("import not_installed_anywhere\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"imports 'not_installed_anywhere', which is missing"):
            tasks.build("importer:Task", {})
    finally:
        sys.path.remove(str(tmp_path))


def test_built_in_tasks_take_their_constructor_arguments():
    assert tasks.build("classify", {"top_k": 3, "label_smoothing": 0.1}).top_k == 3
    with pytest.raises(ConfigError, match=r"'task.args.top_kk'.*did you mean 'task.args.top_k'"):
        tasks.build("classify", {"top_kk": 3})
