"""Issue 16's size measures of the core package, in one command.

    python bench/lines.py            # route/*.py of this checkout
    python bench/lines.py --rev c6b6931   # the same measures at another commit (read with git, nothing checked out)

Prints the total lines (what `wc -l route/*.py` counts) split into code, docstring, comment and blank lines, the
largest files, the longest functions, and any import cycle between route's modules.
"""
import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources(rev: str | None) -> dict[str, str]:
    """module name -> source text of route/*.py, from the work tree or from commit `rev`."""
    if rev is None:
        return {p.stem: p.read_text() for p in sorted((ROOT / "route").glob("*.py"))}
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "route/"], check=True,
                           capture_output=True, text=True).stdout.split()
    return {Path(n).stem: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{n}"], check=True,
                                         capture_output=True, text=True).stdout
            for n in names if n.endswith(".py")}


def kinds(src: str, tree: ast.Module) -> dict[str, int]:
    """Lines of code, docstring, comment and blank (a line is a docstring's if it lies inside one)."""
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    out = dict(code=0, docstring=0, comment=0, blank=0)
    for i, line in enumerate(src.splitlines(), 1):
        s = line.strip()
        out["blank" if not s else "docstring" if i in doc else "comment" if s.startswith("#") else "code"] += 1
    return out


def imports(tree: ast.Module, modules) -> set[str]:
    """The route modules this one imports, at any depth of its code (lazy imports count too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("route")):
            base = (node.module or "").removeprefix("route").lstrip(".")
            out.update([base] if base else [a.name for a in node.names])
    return out & set(modules)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="a git commit to measure instead of the work tree")
    args = ap.parse_args()
    srcs = sources(args.rev)
    trees = {m: ast.parse(s) for m, s in srcs.items()}
    total = dict(code=0, docstring=0, comment=0, blank=0)
    for m, s in srcs.items():
        for k, v in kinds(s, trees[m]).items():
            total[k] += v
    print(f"route/*.py: {sum(total.values())} lines ({', '.join(f'{v} {k}' for k, v in total.items())})")
    sizes = sorted(((len(s.splitlines()), m) for m, s in srcs.items()), reverse=True)
    print("largest files: " + ", ".join(f"{m}.py {n}" for n, m in sizes[:3]))
    funcs = sorted(((n.end_lineno - n.lineno + 1, f"{m}.{n.name}") for m, t in trees.items() for n in ast.walk(t)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), reverse=True)
    print("longest functions: " + ", ".join(f"{name} {n}" for n, name in funcs[:3]))
    found = cycles({m: imports(t, srcs) - {m} for m, t in trees.items()})
    print("import cycles: " + ("; ".join(" -> ".join(c) for c in found) if found else "none"))


if __name__ == "__main__":
    main()
