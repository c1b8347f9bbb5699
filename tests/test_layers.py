"""The layering, read from the source with ``ast`` (every import, lazy ones inside functions too).

embedforge <- actors <- workflows <- jobs: a package imports only from its own layer or the ones
below; workflow packages import each other without a cycle; the debate app uses only the serve
package's shared HTTP helpers, not the embeddings app's internals.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

LAYERS = {"embedforge": 0, "actors": 1, "workflows": 2, "jobs": 3}
SERVE_SHARED = {"workflows.serve", "workflows.serve.config", "workflows.serve.auth", "workflows.serve.limits",
                "workflows.serve.endpoint"}


def node_of(module: str) -> str | None:
    """The graph node of a module: its top-level package, or ``workflows.<name>`` for workflows."""
    parts = module.split(".")
    if parts[0] not in LAYERS:
        return None
    return ".".join(parts[:2]) if parts[0] == "workflows" and len(parts) > 1 else parts[0]


def imports() -> list[tuple[str, str, str]]:
    """``(importing module, imported module, file:line)`` for every project import in the packages."""
    out = []
    for top in LAYERS:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(), str(rel))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.ImportFrom):  # relative: from the importing module's package
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = package[: len(package) - (node.level - 1)]
                    names = [".".join(base + ([node.module] if node.module else []))]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    if node_of(name) is not None:
                        out.append((module, name, f"{rel}:{node.lineno}"))
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in imports():
        a, b = node_of(src), node_of(dst)
        if a != b:
            graph[a].add(b)
    return graph


def test_layers_import_downward_only():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in imports()
           if LAYERS[dst.split(".")[0]] > LAYERS[src.split(".")[0]]]
    assert not bad, "imports against the layering embedforge <- actors <- workflows <- jobs:\n" + "\n".join(bad)


def test_package_graph_has_no_cycle():
    graph = package_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_debate_uses_only_the_serve_packages_shared_helpers():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in imports()
           if node_of(src) == "workflows.debate" and node_of(dst) == "workflows.serve"
           and ".".join(dst.split(".")[:3]) not in SERVE_SHARED]
    assert not bad, "debate reaches into the embeddings app:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_and_bad_imports(tmp_path, monkeypatch):
    """The rules above can fail: a lazy upward import in a fake tree is reported."""
    import tests.test_layers as me

    for top in LAYERS:
        (tmp_path / top).mkdir()
    (tmp_path / "actors" / "x.py").write_text("def f():\n    from workflows.debate.protocol import Turn\n")
    (tmp_path / "workflows" / "debate").mkdir()
    (tmp_path / "workflows" / "debate" / "app.py").write_text(
        "from workflows.serve.model_server import m\nfrom actors.x import f\nfrom .protocol import Turn\n")
    monkeypatch.setattr(me, "REPO", Path(tmp_path))
    found = {(s, d) for s, d, _ in imports()}
    assert {("actors.x", "workflows.debate.protocol"), ("workflows.debate.app", "workflows.debate.protocol")} <= found
    assert package_graph() == {"actors": {"workflows.debate"}, "workflows.debate": {"workflows.serve", "actors"}}
    for check in (test_layers_import_downward_only, test_package_graph_has_no_cycle,
                  test_debate_uses_only_the_serve_packages_shared_helpers):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a tree that breaks it")
