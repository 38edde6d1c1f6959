"""Credentials given in a config never leave the process that read them.

A value whose name marks it as a credential (`key`, `secret`, `token`, `password`, `*_key`, ...)
inside a `storage_options` mapping (at any depth, e.g. `client_kwargs`) is a secret. Every config
the pipeline writes or prints (`Config.to_dict`: run_dir/config.yaml, the W&B run config, the Slurm
snapshot, the Ray payload and job package, `--print-config`) carries `***` in its place.

The real values reach the processes that need them through the environment, never through a file
or Ray's state: `load` records them in the variable PIPELINE_SECRETS of the process that read the
config, which the processes it starts inherit (the local launcher's workers, an in-process Ray
cluster's workers, an sbatch job), and `restore` puts them back where the config says `***`.
On a cluster this process did not start (`submit ray`), give credentials the standard way
(environment variables such as AWS_ACCESS_KEY_ID, or ~/.aws/credentials, which s3fs/boto read).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

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
    try:
        loaded = json.loads(os.environ.get(ENV, "") or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


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


def unresolved(tree: Mapping[str, Any]) -> list[str]:
    """Dotted keys still `***`: redacted in a written config and not recorded in this environment."""
    return [".".join(path) for path, value in _walk(tree, (), False) if value == REDACTED]


def values() -> list[str]:
    """Every secret value recorded in this process (to scrub text that might quote one)."""
    return [v for v in _recorded().values() if v]


def scrub(text: str) -> str:
    """`text` with every recorded secret value replaced by `***`."""
    for value in sorted(values(), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text
