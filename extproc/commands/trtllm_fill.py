"""Fill the ``${name}`` placeholders of a Triton model repository (``triton_models/trtllm``).

NVIDIA's TensorRT-LLM backend ships its model configs as templates filled by
``tools/fill_template.py``; this is the same idea, stricter: a whole repository is copied from
``src`` to ``dest`` and every ``config.pbtxt`` has its placeholders replaced.  It fails, before
writing anything, when a placeholder has no value or a value names no placeholder (a typo would
otherwise silently leave a default in production).

    extproc triton fill triton_models/trtllm /srv/triton-repo --values values.yaml engine_dir=/engines/x

Library use::

    from extproc.commands.trtllm_fill import fill_templates
    written = fill_templates(Path("triton_models/trtllm"), Path("/srv/repo"), {"engine_dir": "/e", ...})
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["FillError", "PLACEHOLDER_RE", "fill_templates", "find_placeholders", "load_values", "main"]

#: ``${name}``: a name is a Python-style identifier.
PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Files whose placeholders are filled (the rest of the tree is copied as is).
TEMPLATE_NAMES = ("config.pbtxt",)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


class FillError(ValueError):
    """Unfilled placeholders, unknown keys, bad values or a bad destination."""


def _templates(src: Path) -> list[Path]:
    return sorted(p for name in TEMPLATE_NAMES for p in src.rglob(name) if "__pycache__" not in p.parts)


def find_placeholders(src: Path) -> dict[str, list[Path]]:
    """Placeholder name -> template files (relative to ``src``) that use it."""
    src = Path(src)
    found: dict[str, list[Path]] = {}
    for path in _templates(src):
        for name in PLACEHOLDER_RE.findall(path.read_text()):
            rel = path.relative_to(src)
            found.setdefault(name, [])
            if rel not in found[name]:
                found[name].append(rel)
    return found


def _as_text(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise FillError(f"value for {key!r} is empty (null)")
    text = str(value)
    if any(c in text for c in ('"', "\n", "\r")) or "${" in text:
        raise FillError(f"value for {key!r} may not contain a double quote, a newline or '${{': {text!r}")
    return text


def fill_templates(src: Path, dest: Path, values: Mapping[str, object], *, overwrite: bool = False) -> list[Path]:
    """Copy the repository ``src`` to ``dest`` with every ``config.pbtxt`` filled from ``values``.

    Returns the filled ``config.pbtxt`` paths under ``dest`` (sorted).  Raises :class:`FillError`
    naming every placeholder without a value and every key that no template uses; nothing is
    written then.  ``dest`` must not exist or be empty unless ``overwrite`` (which replaces it).
    """
    src = Path(src).resolve()
    dest = Path(dest).resolve()
    if not src.is_dir():
        raise FillError(f"source repository {src} is not a directory")
    if dest == src or src in dest.parents:
        raise FillError(f"destination {dest} must be outside the source repository {src}")
    if dest.exists() and not dest.is_dir():
        raise FillError(f"destination {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FillError(f"destination {dest} is not empty (pass overwrite=True / --force to replace it)")

    text_values = {str(k): _as_text(str(k), v) for k, v in values.items()}
    used = find_placeholders(src)
    if not used:
        raise FillError(f"no config.pbtxt with ${{...}} placeholders under {src}")
    missing = sorted(set(used) - set(text_values))
    unknown = sorted(set(text_values) - set(used))
    problems = []
    if missing:
        lines = [f"  ${{{name}}}  (in {', '.join(str(p) for p in used[name])})" for name in missing]
        problems.append("placeholders without a value:\n" + "\n".join(lines))
    if unknown:
        problems.append(
            "unknown keys (no template uses them): " + ", ".join(unknown) + "\n  known keys: " + ", ".join(sorted(used))
        )
    if problems:
        raise FillError("cannot fill " + str(src) + ":\n" + "\n".join(problems))

    filled: dict[Path, str] = {}
    for path in _templates(src):
        text = PLACEHOLDER_RE.sub(lambda m: text_values[m.group(1)], path.read_text())
        left = PLACEHOLDER_RE.findall(text)
        if left:  # a value can't introduce one (checked above); belt and braces
            raise FillError(f"{path}: placeholders left after filling: {sorted(set(left))}")
        filled[path.relative_to(src)] = text

    if dest.exists() and overwrite:
        shutil.rmtree(dest)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=_IGNORE)
    for rel, text in filled.items():
        (tmp / rel).write_text(text)
    if dest.exists():  # empty directory
        dest.rmdir()
    os.replace(tmp, dest)
    return sorted(dest / rel for rel in filled)


def load_values(path: Path) -> dict[str, object]:
    """Read a ``key: value`` YAML mapping."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise FillError(f"cannot read values file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise FillError(f"values file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FillError(f"values file {path} must hold a mapping of key: value, not {type(data).__name__}")
    for k, v in data.items():
        if isinstance(v, (dict, list)):
            raise FillError(f"values file {path}: {k!r} must be a scalar, not {type(v).__name__}")
    return {str(k): v for k, v in data.items()}


def _parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FillError(f"expected key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Copy a Triton model repository and fill the ${name} placeholders of its config.pbtxt files.",
    )
    ap.add_argument("src", type=Path, metavar="SRC", help="template repository, e.g. triton_models/trtllm")
    ap.add_argument("dest", type=Path, nargs="?", metavar="DEST", help="output repository (must not exist or be empty)")
    ap.add_argument("pairs", nargs="*", metavar="key=value", help="values; override those of --values")
    ap.add_argument("--values", type=Path, metavar="FILE.yaml", help="YAML mapping of key: value")
    ap.add_argument("--force", action="store_true", help="replace DEST if it is not empty")
    ap.add_argument("--list", action="store_true", help="only list the placeholders of SRC and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``extproc triton fill``). Returns a process exit code."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.dest is None and not args.list:
        parser.error("the following arguments are required: DEST")
    try:
        if args.list:
            if not Path(args.src).is_dir():
                raise FillError(f"source repository {args.src} is not a directory")
            for name, files in sorted(find_placeholders(args.src).items()):
                print(f"{name}\t{', '.join(map(str, files))}")
            return 0
        values: dict[str, object] = {}
        if args.values:
            values.update(load_values(args.values))
        values.update(_parse_pairs(args.pairs))
        written = fill_templates(args.src, args.dest, values, overwrite=args.force)
    except FillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
