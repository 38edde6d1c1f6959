"""Users' own code, named in the config by an import path: `package.module:Name` or `path/to/file.py:Name`.

Used for `model.name`, `task.name` and `data.decode`. Resolution happens on the driver first (a wrong
path is a ConfigError naming the key, exit 2, before any worker starts); the directories the user's
modules were found in travel to the workers (`module_roots`, `add_paths`), so a worker started by Ray
or torch.multiprocessing imports them as the driver did, whatever its cwd and sys.path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError


def is_import_path(name: str) -> bool:
    """`pkg.mod:Name` or `file.py:Name` (registry names never contain ':')."""
    return ":" in name


def split(path: str, *, key: str) -> tuple[str, str]:
    """('pkg.mod' or 'file.py', 'Name'); a ConfigError naming `key` if it is not of that form."""
    module, _, attr = path.rpartition(":")
    if not module or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(
            f"config key '{key}': '{path}' is not an import path; use 'package.module:Name' or "
            "'path/to/file.py:Name'"
        )
    return module, attr


def is_file_path(module: str) -> bool:
    """Whether the module part of an import path names a file (`dir/x.py`) rather than a module."""
    return module.endswith(".py") or "/" in module or "\\" in module


def _file_module_name(path: Path) -> str:
    # one stable name per file, so pickling (Ray, DataLoader processes) finds the same module again
    return f"_pipeline_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def _import_file(module: str, *, key: str) -> Any:
    path = Path(module).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file {module} does not exist")
    name = _file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config key '{key}': {module} cannot be imported as a Python module")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException as e:
        del sys.modules[name]
        raise ConfigError(f"config key '{key}': importing {module} failed: {type(e).__name__}: {e}") from e
    return loaded


def _import_module(module: str, *, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        own = module == missing or module.startswith(f"{missing}.")  # the path's own package is missing
        where = "" if own else f" (it imports '{missing}', which is missing)"
        raise ConfigError(
            f"config key '{key}': cannot import module '{module}'{where}; install the package, or put "
            "its directory on PYTHONPATH"
        ) from e
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ConfigError(
            f"config key '{key}': importing module '{module}' failed: {type(e).__name__}: {e}"
        ) from e


def load_object(path: str, *, key: str) -> Any:
    """The object an import path names. ConfigError (naming `key` and the path) if it cannot be
    imported or the module has no such name."""
    module_name, attr = split(path, key=key)
    load = _import_file if is_file_path(module_name) else _import_module
    module = load(module_name, key=key)
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ConfigError(
                f"config key '{key}': '{module_name}' has no '{attr}' (it defines: {', '.join(names[:12])})"
            ) from None
    return target


def load_class(path: str, *, key: str, base: type, what: str) -> type:
    """`load_object`, checked to be a subclass of `base` (`what` names it in the error)."""
    target = load_object(path, key=key)
    if not (isinstance(target, type) and issubclass(target, base)):
        kind = "a class" if isinstance(target, type) else f"a {type(target).__name__}"
        raise ConfigError(f"config key '{key}': '{path}' is {kind}, but not a subclass of {what}")
    return target


def absolute(path: str) -> str:
    """A file import path made absolute (workers may run in another cwd); a module path unchanged."""
    if not is_import_path(path):
        return path
    module, _, attr = path.rpartition(":")
    return f"{Path(module).expanduser().resolve()}:{attr}" if is_file_path(module) else path


def module_roots(paths: list[str]) -> list[str]:
    """The sys.path entries the modules of these (already loaded) `package.module:Name` paths were
    found under: the directory holding each top-level package. (A `file.py:Name` is loaded by its
    absolute path, as on the driver, so its directory is not put on sys.path: a sibling `random.py`
    would shadow the standard library's.)"""
    roots: list[str] = []
    for path in paths:
        if not is_import_path(path):
            continue
        module, _, _ = path.rpartition(":")
        if is_file_path(module):
            continue
        top = sys.modules.get(module.split(".")[0])
        if getattr(top, "__file__", None) is None:  # a namespace package or a builtin: nothing to ship
            continue
        root = top_level_source(top).parent
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def top_level_source(module: Any) -> Path:
    """Where a loaded top-level module lives: its package directory, or its single .py file (for a
    namespace package, its one directory; see `__path__`)."""
    locations = list(getattr(module, "__path__", []))
    return Path(locations[0] if locations else module.__file__).resolve()


def add_paths(roots: list[str]) -> None:
    """Make a worker import users' modules as the driver did (see `module_roots`); appended, so
    nothing the worker's environment provides is shadowed."""
    for root in roots:
        if root not in sys.path:
            sys.path.append(root)
