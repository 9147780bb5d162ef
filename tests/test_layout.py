"""The shape of the tree: no import cycles (counting imports under `if TYPE_CHECKING:`, which are
cycles of meaning even where Python never runs them), dependencies that point one way across the
folders, and a top level that holds only the product's folders, the CLI and a few shared basics. Read
from the source with `ast`, so it costs no imports."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "constmig"
TOP_LEVEL = {"__init__", "__main__", "cli", "options", "errors", "files", "units", "progress"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every constmig module `path` imports, at any depth, `if TYPE_CHECKING:` blocks included."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            out.update(subs if len(subs) == len(node.names) else {node.module, *subs})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: imports(p, set(files)) - {m} for m, p in files.items()}


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v):], v])
            elif v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """Positive control: the same walk over two modules that import each other lazily."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    import b\n")
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    assert imports(a, {"a", "b"}) == {"b"} and imports(b, {"a", "b"}) == {"a"}


def test_top_level_holds_folders_cli_and_basics() -> None:
    top = {p.stem for p in PKG.glob("*.py")}
    assert top <= TOP_LEVEL, f"modules at the top level that belong in a folder: {sorted(top - TOP_LEVEL)}"


def test_trusted_code_does_not_import_the_untrusted_side() -> None:
    """enclave/, migration/, wire/ and tee/ run inside the enclave: they import nothing from host/,
    bench/ or testbed/ (the agent and the tools may import them, never the other way)."""
    trusted = ("constmig.enclave", "constmig.migration", "constmig.wire", "constmig.tee", "constmig.kernel")
    untrusted = ("constmig.host", "constmig.bench", "constmig.testbed", "constmig.cli")
    bad = {m: sorted(d for d in deps if d.startswith(untrusted))
           for m, deps in graph().items() if m.startswith(trusted)}
    assert not {m: d for m, d in bad.items() if d}


def test_enclave_imports_migration_only_where_the_process_is_wired() -> None:
    """The enclave runtime is below the migration code (which drives it through migration/port.py), but
    the enclave process is wired together in enclave/runtime.py: that one module may import migration/."""
    bad = {m: sorted(d for d in deps if d.startswith("constmig.migration"))
           for m, deps in graph().items() if m.startswith("constmig.enclave") and m != "constmig.enclave.runtime"}
    assert not {m: d for m, d in bad.items() if d}


def test_the_kernel_layer_is_below_both() -> None:
    bad = {m: sorted(d for d in deps if d.startswith(("constmig.enclave", "constmig.migration")))
           for m, deps in graph().items() if m.startswith("constmig.kernel")}
    assert not {m: d for m, d in bad.items() if d}


def test_test_files_have_unique_names() -> None:
    """Test folders are not packages, so two test files of one name break the collection of the whole suite."""
    names = [p.name for p in Path(__file__).parent.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
