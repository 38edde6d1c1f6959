"""Credentials given in a config never leave the process that read them.

A value whose name marks it as a credential (`key`, `secret`, `token`, `password`, `*_key`, ...)
inside a `storage_options` mapping (at any depth, e.g. `client_kwargs`) is a secret. Every config
the pipeline writes or prints (`Config.to_dict`: run_dir/config.yaml, the W&B run config, the Slurm
snapshot, the Ray payload and job package, `--print-config`) carries `***` in its place.

The real values reach the processes that need them through the environment, never through a file
or Ray's state: `load` records them in the variable PIPELINE_SECRETS of the process that read the
config, which the processes it starts inherit (the local launcher's workers, an in-process Ray
cluster's workers, an sbatch job), and `restore` puts them back where the config says `***`.
On a cluster this process did not start (`submit ray`, `cluster.address` of a running cluster), give
credentials the standard way (environment variables such as AWS_ACCESS_KEY_ID, or ~/.aws/credentials,
which s3fs/boto read): `submit ray` leaves them out of the job (`strip`) rather than ship them.

What the run writes that could quote one is private to its user (`write_private`, `private_dir`:
0600 files, 0700 dirs), and text the pipeline writes or prints after a failure is `scrub`bed.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

REDACTED = "***"
ENV = "PIPELINE_SECRETS"
CONTAINER = "storage_options"
_EXACT = frozenset({"key", "secret", "token", "password", "passwd", "credentials", "sas"})
_PARTS = ("secret", "password", "passwd", "token", "credential")
_SUFFIXES = ("_key", "_key_id", "_sas")


def is_secret_name(name: str) -> bool:
    """Whether an option called `name` (inside storage_options) holds a credential."""
    lowered = name.lower()
    return lowered in _EXACT or any(p in lowered for p in _PARTS) or lowered.endswith(_SUFFIXES)


def _walk(node: Any, path: tuple[str, ...], inside: bool) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every secret leaf; `inside`: below a storage_options mapping."""
    if not isinstance(node, Mapping):
        return
    for key, value in node.items():
        key = str(key)
        here = (*path, key)
        if inside and is_secret_name(key) and not isinstance(value, Mapping):
            yield here, value
        else:
            yield from _walk(value, here, inside or key == CONTAINER)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def redact(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config tree with every secret replaced by `***` (None and "" stay as they are)."""
    out = copy.deepcopy(dict(tree))
    for path, value in list(_walk(out, (), False)):
        if value not in (None, ""):
            _set(out, path, REDACTED)
    return out


def collect(tree: Mapping[str, Any]) -> dict[str, str]:
    """The secrets a tree holds in clear: dotted path -> value."""
    return {
        ".".join(path): str(value)
        for path, value in _walk(tree, (), False)
        if value not in (None, "", REDACTED)
    }


def _recorded() -> dict[str, str]:
    return dict(_parse(os.environ.get(ENV, "")))


@functools.lru_cache(maxsize=4)  # scrub() runs per forwarded console line
def _parse(raw: str) -> tuple[tuple[str, str], ...]:
    try:
        loaded = json.loads(raw or "{}")
    except ValueError:
        return ()
    return tuple((str(k), str(v)) for k, v in loaded.items()) if isinstance(loaded, dict) else ()


def remember(tree: Mapping[str, Any]) -> None:
    """Record the tree's secrets in this process's environment, which the processes it starts inherit
    (never a file: the environment of a process is readable only by its user and by root)."""
    found = collect(tree)
    if found:
        os.environ[ENV] = json.dumps(_recorded() | found)


def restore(tree: dict[str, Any]) -> dict[str, Any]:
    """Put recorded secrets back where `tree` says `***` (in place; returns `tree`)."""
    recorded = _recorded()
    for path, value in list(_walk(tree, (), False)):
        dotted = ".".join(path)
        if value == REDACTED and dotted in recorded:
            _set(tree, path, recorded[dotted])
    return tree


def strip(tree: dict[str, Any]) -> list[str]:
    """Remove every secret from `tree` (in place): for a config sent where this environment does not
    go (`submit ray`), whose nodes then read their own credentials. Returns the removed dotted keys."""
    found = [path for path, value in _walk(tree, (), False) if value not in (None, "")]
    for path in found:
        node = tree
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    return [".".join(path) for path in found]


def unresolved(tree: Mapping[str, Any]) -> list[str]:
    """Dotted keys still `***`: redacted in a written config and not recorded in this environment."""
    return [".".join(path) for path, value in _walk(tree, (), False) if value == REDACTED]


# Credentials the standard way (environment variables), scrubbed like the config's own.
ENV_CREDENTIALS = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def values() -> list[str]:
    """Every secret value this process knows: recorded from a config, or in ENV_CREDENTIALS (to scrub
    text that might quote one)."""
    from_env = [os.environ.get(name, "") for name in ENV_CREDENTIALS]
    return [v for v in [*_recorded().values(), *from_env] if v]


def scrub(text: str) -> str:
    """`text` with every recorded secret value replaced by `***`."""
    for value in sorted(values(), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def scrub_file(path: Path) -> None:
    """Scrub a text file the pipeline keeps (a log) in place; binary files are left alone."""
    found = values()
    if not found or not path.is_file():
        return
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError):
        return
    if any(value in text for value in found):
        path.write_text(scrub(text))


# Files and dirs of a run that could quote a credential or what surrounds one (config, job script,
# events, logs): readable by their user only, whatever the umask.
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing, and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR)
    return path


def open_private(path: Path, mode: str = "w", **kwargs: Any) -> IO[Any]:
    """`open(path, mode)` for a file created 0600 (never readable by others, not even briefly); an
    existing file is made 0600 too."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return os.fdopen(fd, mode, **kwargs)


def write_private(path: Path, text: str) -> None:
    """`path.write_text(text)` for a 0600 file."""
    with open_private(path, "w") as f:
        f.write(text)
