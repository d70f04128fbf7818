"""The layout's rules: science never imports dagster, no import cycles, lazy definitions without side effects,
and data shipped inside the package (found without the repository)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PKG = REPO / "spatial_assets"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the spatial_assets modules (and of dagster) that ``path`` imports."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")
                base = base[: len(base) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in n.names}
    return out


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def test_science_never_imports_dagster():
    offenders = {
        m: sorted(i for i in _imports(p, top_level_only=False) if i.split(".")[0].startswith("dagster"))
        for m, p in MODULES.items()
        if ".orchestration" not in m
    }
    assert not {m: v for m, v in offenders.items() if v}


def test_no_import_cycles():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            # a package's __init__ importing its own submodules is not a cycle
            if m == d.rpartition(".")[0] and MODULES[m].name == "__init__.py":
                continue
            if state.get(d) == 1 and not d.startswith(m + "."):
                cyc = stack[stack.index(d) :] + [d] if d in stack else [m, d]
                if not any(MODULES[x].name == "__init__.py" for x in cyc[:-1]):
                    raise AssertionError(f"import cycle: {' -> '.join(cyc)}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.slow
def test_definitions_load_lazily_without_side_effects(tmp_path, demo_small):
    env = {k: v for k, v in os.environ.items() if k != "SPATIAL_ASSETS_CONFIG"}
    code = "import spatial_assets.orchestration.definitions as d, dagster as dg; print(type(d.defs).__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LazyDefinitions"
    assert list(tmp_path.iterdir()) == []  # nothing read or written: no config there, no demo built

    cfg = tmp_path / "proj.yaml"
    cfg.write_text(
        f"storage_root: {tmp_path / 'store'}\nreferences: [{{name: r, path: {demo_small.reference}}}]\n"
        f"samples: [{{name: s, spatial: {demo_small.slide}, image: {demo_small.image}, reference: r}}]\n"
    )
    code = (
        "import spatial_assets.orchestration.definitions as d; defs = d.defs(); "
        "print(sorted(j.name for j in defs.jobs))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**env, "SPATIAL_ASSETS_CONFIG": str(cfg)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "'decomposition_job'" in out.stdout and "'reference_job'" in out.stdout
    assert not (tmp_path / "store").exists()


def test_packaged_data_and_model_are_found_without_the_repository():
    from spatial_assets.datasets import data_path
    from spatial_assets.segmentation import bundled_models

    assert data_path("osmfish-sscortex", "osmfish_sscortex_6471cells.h5ad").is_file()
    assert data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad").is_file()
    assert (bundled_models()["stardist_nuclei"] / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="packaged data file missing"):
        data_path("nope", "missing.h5ad")
