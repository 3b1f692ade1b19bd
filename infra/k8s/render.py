"""Render a `${NAME}` template of infra/k8s (e.g. pytorchjob.yaml) and print it for `kubectl apply -f -`.

    python infra/k8s/render.py infra/k8s/pytorchjob.yaml JOB_NAME=... IMAGE=... PARAMS_CONFIGMAP=...

Variables and their defaults are declared in the template's `#@ NAME[=default]` lines; values come
from the command line, then the environment, then those defaults. A variable without a value, or a
value for a variable the template does not declare, is an error naming it. Standard library only, so
a flow can load it with `runpy`/`importlib` and call `render(path, values)`.
"""

from __future__ import annotations

import os
import re
import string
import sys
from pathlib import Path

_DECL = re.compile(r"^#@\s*([A-Z][A-Z0-9_]*)(?:=(.*))?$")
# A DNS-1123 label: what Kubernetes accepts as a name (job, configmap, claim, secret, namespace).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME_VARS = {"JOB_NAME", "NAMESPACE", "PARAMS_CONFIGMAP", "SHARED_PVC", "STACK_SECRET"}


def declared(text: str) -> dict[str, str | None]:
    """`#@` declarations of a template: name -> default (None = required)."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        m = _DECL.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def render(path: str | Path, values: dict[str, str], environ: dict[str, str] | None = None) -> str:
    path = Path(path)
    text = path.read_text()
    decl = declared(text)
    unknown = sorted(set(values) - set(decl))
    if unknown:
        raise ValueError(f"{path}: no variable(s) {unknown}; it declares {sorted(decl)}")
    used = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(text)} - {None}
    undeclared = sorted(used - set(decl))
    if undeclared:
        raise ValueError(f"{path}: uses undeclared variable(s) {undeclared} (add `#@ NAME` lines)")
    env = os.environ if environ is None else environ
    resolved: dict[str, str] = {}
    for name, default in decl.items():
        value = values.get(name, env.get(name, default))
        if value is None:
            raise ValueError(f"{path}: variable {name} has no value (pass {name}=...)")
        if name in _NAME_VARS and not _NAME.match(value):
            raise ValueError(f"{path}: {name}={value!r} is not a valid Kubernetes name (lowercase a-z, 0-9, '-')")
        resolved[name] = value
    return string.Template(text).substitute(resolved)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        return 0 if argv else 2
    values = {}
    for arg in argv[1:]:
        name, sep, value = arg.partition("=")
        if not sep:
            print(f"error: expected NAME=VALUE, got {arg!r}", file=sys.stderr)
            return 2
        values[name] = value
    try:
        sys.stdout.write(render(argv[0], values))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
