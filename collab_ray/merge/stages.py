"""Multi-stage merges (mergekit-multimerge): a multi-document YAML whose documents are merge configs.

A document may carry `name: NAME`; later documents use NAME as a model reference (also as
`NAME+adapter`, a base_model or a tokenizer source) to mean that merge's output. Stages run in
dependency order; each intermediate is written to a temporary directory beside the output and
removed at the end. The final merge is the unnamed document, or else the one named stage no other
stage uses.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from collab_ray.core.errors import ConfigError

REFERENCE_KEYS = ("model", "base_model", "source", "tokenizer_source")


def read_documents(source: Any) -> list[dict] | None:
    """The documents of a YAML file or text if it is a multi-stage config (several documents or a `name`), else None."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8")
    elif isinstance(source, str):
        text = source
    else:
        return None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return None  # the single-document loader reports the error
    if len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and "name" in docs[0]):
        return docs
    return None


def plan_stages(docs: list[Any]) -> tuple[list[tuple[str, dict]], dict]:
    """([(name, config with stage names still unresolved)] in dependency order, the final config)."""
    named: dict[str, dict] = {}
    finals = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"document {i + 1}: a merge config must be a mapping, got {type(doc).__name__}")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is None:
            finals.append(doc)
        elif not isinstance(name, str) or not name:
            raise ConfigError(f"document {i + 1}: name must be a non-empty string, got {name!r}")
        elif name in named:
            raise ConfigError(f"document {i + 1}: stage name {name!r} is used twice")
        else:
            named[name] = doc
    uses = {name: _references(doc, named) for name, doc in named.items()}
    if len(finals) > 1:
        raise ConfigError(f"{len(finals)} documents have no name; only the final merge may be unnamed")
    if finals:
        final = finals[0]
    else:
        unused = [n for n in named if not any(n in used for used in uses.values())]
        if len(unused) != 1:
            raise ConfigError(f"no unnamed final merge, and {len(unused)} stages are used by no other ({unused}); name the final one out")
        final = named.pop(unused[0])
        uses.pop(unused[0])
    order: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        if name in order:
            return
        if name in path:
            raise ConfigError(f"stages depend on each other in a cycle: {' -> '.join([*path[path.index(name):], name])}")
        for dependency in sorted(uses[name]):
            visit(dependency, [*path, name])
        order.append(name)

    for name in sorted(_references(final, named), key=list(named).index):
        visit(name, [])
    return [(name, named[name]) for name in order], final


def _references(node: Any, names: dict) -> set[str]:
    """Stage names that `node` (a config, or part of one) uses as model references."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in REFERENCE_KEYS and isinstance(value, str) and value.split("+")[0].removeprefix("model:") in names:
                found.add(value.split("+")[0].removeprefix("model:"))
            else:
                found |= _references(value, names)
    elif isinstance(node, list):
        for value in node:
            found |= _references(value, names)
    return found


def substitute(node: Any, paths: dict[str, str]) -> Any:
    """`node` with every stage-name model reference replaced by that stage's output directory."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in REFERENCE_KEYS and isinstance(value, str):
                head, plus, adapter = value.partition("+")
                prefix = "model:" if head.startswith("model:") else ""
                head = head.removeprefix("model:")
                out[key] = f"{prefix}{paths[head]}{plus}{adapter}" if head in paths else value
            else:
                out[key] = substitute(value, paths)
        return out
    if isinstance(node, list):
        return [substitute(v, paths) for v in node]
    return node


def run_stages(docs: list[Any], out_dir: Path, run_one: Callable[[dict, Path], Any], run_final: Callable[[dict], Any]) -> Any:
    """Merge each stage with `run_one(config, dir)` into a temporary directory beside `out_dir`, then
    the final config with `run_final(config)`; every config is validated before the first merge."""
    from collab_ray.merge.config import load_config

    stages, final = plan_stages(docs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stages-", dir=out_dir.parent))
    try:
        paths = {name: str(work / name) for name, _ in stages}
        configs = [(name, substitute(doc, paths)) for name, doc in stages]
        for name, config in [*configs, ("final merge", substitute(final, paths))]:
            try:
                load_config(config)
            except ConfigError as e:
                raise ConfigError(f"stage {name!r}: {e}") from None
        for name, config in configs:
            run_one(config, work / name)
        return run_final(substitute(final, paths))
    finally:
        shutil.rmtree(work, ignore_errors=True)
