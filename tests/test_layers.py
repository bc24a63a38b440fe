"""The layers import one way: models (`vae`) <- data I/O (`jobs.inputs`, `jobs.dataset`, `jobs.quality`)
<- orchestration (`jobs.orchestration`) <- entrypoints (the modules of `jobs/`).

Every module's imports are read with `ast` (imports inside functions included), so an arrow
pointing the wrong way fails here, not later as an import cycle or a Ray dependency in a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ENTRYPOINTS = {
    "jobs.precompute",
    "jobs.reconstruct",
    "jobs.validate",
    "jobs.status",
    "jobs.demo_data",
    "jobs.train_demo_vae",
}
DATA_IO = ("jobs.inputs", "jobs.dataset", "jobs.quality")
# The modules of `vae` that read files; the rest (the models, tiling and planning) do no I/O.
VAE_IO = {"vae", "vae.checkpoint", "vae.loading", "vae.families", "vae.diffusers_folder", "vae.registry"}
IO_LIBRARIES = {"safetensors", "json", "pathlib", "tarfile", "glob", "shutil", "pickle", "av", "pyarrow", "webdataset"}
CLUSTER_LIBRARIES = {"ray"}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports (absolute names; `from a import b` gives `a` and `a.b`)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(modules: dict[str, set[str]]) -> list[str]:
    """`importer -> imported: rule` for every import that points the wrong way."""
    found = []

    def refuse(importer: str, imported: str, rule: str) -> None:
        found.append(f"{importer} -> {imported}: {rule}")

    for importer, names in sorted(modules.items()):
        for name in sorted(names):
            top = name.split(".")[0]
            if _within(importer, "vae"):
                if top == "jobs":
                    refuse(importer, name, "vae imports nothing of jobs")
                if top in CLUSTER_LIBRARIES or top in {"webdataset", "pyarrow", "av", "tarfile"}:
                    refuse(importer, name, "vae knows no Ray, tar files or Parquet")
                if importer not in VAE_IO and (top in IO_LIBRARIES or name in VAE_IO - {"vae"}):
                    refuse(importer, name, "models import no I/O")
            if any(_within(importer, layer) for layer in DATA_IO):
                if top in CLUSTER_LIBRARIES:
                    refuse(importer, name, "the input side and the dataset format import no Ray")
                if _within(name, "jobs.orchestration") or name in ENTRYPOINTS:
                    refuse(importer, name, "data I/O imports no orchestration")
                own = next(layer for layer in DATA_IO if _within(importer, layer))
                other = [layer for layer in DATA_IO if layer != own and _within(name, layer)]
                if other:
                    refuse(importer, name, "inputs, dataset and quality do not import each other")
            if _within(importer, "jobs.orchestration") and name in ENTRYPOINTS:
                refuse(importer, name, "orchestration imports no entrypoint")
            if _within(importer, "vae") or _within(importer, "jobs"):
                if top in {"tests", "benchmarks", "conftest"}:
                    refuse(importer, name, "the project imports no tests or benchmarks")
    return found


def project_modules() -> dict[str, set[str]]:
    modules = {}
    for package in ("vae", "jobs"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            modules[name] = imports(path.read_text(), name, path.name == "__init__.py")
    return modules


def test_every_import_points_down():
    modules = project_modules()
    assert {"vae.spec", "jobs.inputs.video", "jobs.dataset.writer", "jobs.orchestration.pool"} <= set(modules)
    assert violations(modules) == []


def test_leaf_modules_import_nothing_of_the_package():
    modules = project_modules()
    # objectstore: shared by inputs and dataset; forkserver: imported before torch by the encoder actor
    for leaf in ("vae.spec", "vae.errors", "jobs.objectstore", "jobs.inputs.forkserver"):
        assert not {n for n in modules[leaf] if _within(n, "vae") or _within(n, "jobs")}, leaf
    assert {n for n in modules["vae.checkpoint"] if _within(n, "vae")} <= {"vae.errors", "vae.errors.CheckpointError"}


@pytest.mark.parametrize(
    ("module", "source", "rule"),
    [
        ("vae.spec", "from jobs.dataset.layout import SCHEMA", "vae imports nothing of jobs"),
        ("vae.tiling", "def f():\n    import ray\n", "vae knows no Ray"),
        ("vae.causal_3d", "from safetensors import safe_open", "models import no I/O"),
        ("vae.codec", "from vae.registry import get_preset", "models import no I/O"),
        ("jobs.inputs.video", "import ray", "import no Ray"),
        ("jobs.dataset.reader", "from jobs.orchestration.config import JobConfig", "imports no orchestration"),
        ("jobs.dataset.writer", "from ..orchestration import worker", "imports no orchestration"),
        ("jobs.quality.media", "from jobs.precompute import main", "imports no orchestration"),
        ("jobs.inputs.shards", "from jobs.dataset import layout", "do not import each other"),
        ("jobs.orchestration.pool", "import jobs.reconstruct", "orchestration imports no entrypoint"),
    ],
)
def test_an_arrow_the_wrong_way_is_caught(module, source, rule):
    found = violations({module: imports(source, module)})
    assert found and all(rule in v for v in found), found


def family_name_tests(source: str) -> list[str]:
    """Comparisons of a `family` (or `family.name`) with a string: branches on which model runs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [ast.unparse(s) for s in sides]
            if any(n.endswith(("family", "family.name")) for n in names) and any(
                isinstance(s, ast.Constant | ast.Dict | ast.Set | ast.Tuple | ast.Name) and not n.endswith("family")
                for s, n in zip(sides, names)
            ):
                found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("module", ["vae/tiling.py", "vae/codec.py", "vae/memory.py", "vae/loading.py"])
def test_shared_code_asks_the_family_instead_of_testing_its_name(module):
    assert family_name_tests((REPO / module).read_text()) == []


def test_a_branch_on_a_family_name_is_caught():
    assert family_name_tests('if preset.family == "dc_ae":\n    pass\n')
    assert family_name_tests('if preset.family.name in ("causal_3d",):\n    pass\n')
    assert family_name_tests("if preset.family not in OPENSORA_TRAINING:\n    pass\n")
    assert not family_name_tests("if preset.family.opensora is None:\n    pass\n")


def cycles(modules: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the given modules (an imported name counts as its module)."""

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for n in names if (t := target(n)) is not None and t != m} for m, names in modules.items()}
    found, state = [], dict.fromkeys(modules, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state[n] == 1:
                found.append([*path[path.index(n) :], n] if n in path else [m, n])
            elif state[n] == 0:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(modules):
        if state[m] == 0:
            visit(m, [m])
    return found


def test_no_import_cycles():
    assert cycles(project_modules()) == []


def test_a_cycle_held_by_a_function_level_import_is_caught():
    modules = {
        "vae.presets": imports("from vae.autoencoder_2d import X\n", "vae.presets"),
        "vae.loading": imports("from vae.presets import get_preset\n", "vae.loading"),
        "vae.autoencoder_2d": set(),
    }
    modules["vae.presets"] |= imports("def get_preset():\n    from vae.loading import load\n", "vae.presets")
    assert cycles(modules) == [["vae.loading", "vae.presets", "vae.loading"]]
