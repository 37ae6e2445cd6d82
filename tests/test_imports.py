"""Start-up cost: ``import bigglm`` and the CLI's quick answers load no heavy library.

Public names load on first use (PEP 562, :mod:`bigglm._lazy`) and the command line imports
what a sub-command needs only when it runs. Each check reads ``sys.modules`` in a fresh
interpreter (no timings), so it fails as soon as an eager import comes back.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pydoc
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The packages whose public names are lazy.
PACKAGES = (
    "bigglm",
    "bigglm.design",
    "bigglm.glm",
    "bigglm.group",
    "bigglm.inference",
    "bigglm.io",
)
#: Libraries that neither ``import bigglm`` nor ``bigglm --help`` may load.
HEAVY = (
    "dask",
    "distributed",
    "formulaic",
    "matplotlib",
    "nibabel",
    "numba",
    "numpy",
    "pandas",
    "pydantic",
    "scipy",
    "xarray",
    "yaml",
    "zarr",
)
#: What ``bigglm validate`` may not load: it reads headers and builds designs (NumPy,
#: pandas, nibabel), but touches no voxel data, store or cluster.
NOT_FOR_VALIDATE = (
    "dask.array",
    "distributed",
    "formulaic",
    "matplotlib",
    "scipy.signal",
    "scipy.special",
    "scipy.stats",
    "xarray",
    "zarr",
)

#: Runs the command line in the child as the ``bigglm`` script does, then reports.
CLI = """
from bigglm.cli import main

try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
"""


def _fresh(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a new interpreter; its globals ``status`` and ``result`` (if set) and
    the modules it loaded (``loaded``), as a dict."""
    script = "\n".join(
        [
            "import json, sys",
            "_before = set(sys.modules)",
            textwrap.dedent(code),
            "_report = {k: v for k, v in globals().items() if k in ('status', 'result')}",
            "_report['loaded'] = sorted(set(sys.modules) - _before)",
            "print(json.dumps(_report))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    report["stderr"] = done.stderr
    return report


def _among(loaded: list[str], libraries: tuple[str, ...]) -> list[str]:
    """The modules of ``loaded`` that are (in) one of ``libraries``."""
    return [m for m in loaded if any(m == lib or m.startswith(f"{lib}.") for lib in libraries)]


def _typed_names(package: str) -> list[tuple[str, str]]:
    """``(module, name)`` of each ``from module import name`` under ``if TYPE_CHECKING:``."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    tree = ast.parse(init.read_text(encoding="utf-8"))
    return [
        (str(node.module), alias.name)
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]


# --- the library -------------------------------------------------------------------------


def test_import_bigglm_loads_no_heavy_library() -> None:
    """Importing every lazy package and listing its names loads only the standard library."""
    report = _fresh(
        """
        import bigglm, bigglm.design, bigglm.glm, bigglm.io

        packages = (bigglm, bigglm.design, bigglm.glm, bigglm.io)
        result = [sorted(set(p.__all__) - set(dir(p))) for p in packages]
        """
    )
    assert _among(report["loaded"], HEAVY) == []
    assert report["result"] == [[], [], [], []]  # dir() shows every public name unloaded


@pytest.mark.parametrize("submodules_first", [False, True], ids=["names-first", "modules-first"])
def test_public_names_are_their_eager_imports(submodules_first: bool) -> None:
    """Each name in ``__all__`` is the object its ``TYPE_CHECKING`` import names.

    ``modules-first`` imports the defining modules before looking the names up, which
    must not change what the names are, just as with eager imports.
    """
    homes = {package: _typed_names(package) for package in PACKAGES}
    report = _fresh(
        """
        import importlib

        homes, first = json.loads(sys.argv[1]), sys.argv[2] == "True"

        def home(package, module, name):
            if module == package:  # from bigglm import design: the subpackage
                return importlib.import_module(f"{package}.{name}")
            return getattr(importlib.import_module(module), name)

        if first:
            for package, names in homes.items():
                for module, name in names:
                    home(package, module, name)
        result = {}
        for package, names in homes.items():
            pkg = importlib.import_module(package)
            eager = set(vars(pkg))
            typed = {name for _, name in names}
            wrong = [n for m, n in names if getattr(pkg, n) is not home(package, m, n)]
            public = set(pkg.__all__)
            untyped, extra = sorted(public - eager - typed), sorted(typed - public)
            result[package] = {"wrong": wrong, "untyped": untyped, "extra": extra}
        """,
        json.dumps(homes),
        str(submodules_first),
    )
    clean = {"wrong": [], "untyped": [], "extra": []}
    assert report["result"] == dict.fromkeys(PACKAGES, clean)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_public_function_shares_a_submodule_name(package: str) -> None:
    """``bigglm.io.conversion`` is a module and ``bigglm.io.convert`` a function, never both.

    When a package exports a function named like one of its modules, importing the module
    rebinds the package attribute, and ``import bigglm.io.convert as m`` gives the function.
    """
    import pkgutil

    pkg = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(pkg.__path__)}
    functions = [n for n in pkg.__all__ if not inspect.ismodule(getattr(pkg, n))]
    assert sorted(submodules & set(functions)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_attribute_is_the_usual_error(package: str) -> None:
    pkg = importlib.import_module(package)
    with pytest.raises(AttributeError, match=rf"^module '{package}' has no attribute 'nope'$"):
        pkg.nope  # noqa: B018 - the look-up is the test
    assert not hasattr(pkg, "nope")


@pytest.mark.parametrize("package", PACKAGES)
def test_help_and_introspection_see_the_lazy_names(package: str) -> None:
    """pydoc (``help``) and ``inspect.getmembers`` (as Sphinx's autodoc) list every name."""
    pkg = importlib.import_module(package)
    members = dict(inspect.getmembers(pkg))
    assert set(pkg.__all__) <= set(members)
    text = pydoc.render_doc(pkg, renderer=pydoc.plaintext)
    for name in pkg.__all__:
        if inspect.isfunction(members[name]):
            assert f"{name}(" in text, name


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--help"], ["validate", "--help"], ["frobnicate"]], ids=["help", "sub-help", "usage"]
)
def test_help_and_usage_errors_load_no_heavy_library(args: list[str]) -> None:
    report = _fresh(CLI, *args)
    assert report["status"] == (2 if args == ["frobnicate"] else 0)
    assert _among(report["loaded"], HEAVY) == []


def test_validate_loads_no_dask_array(tmp_path: Path) -> None:
    """``bigglm validate configs/demo.yaml`` (on the demo's data) builds designs, no arrays."""
    from bigglm.demo import make_dataset

    (tmp_path / "configs").mkdir()
    config = shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "configs")
    make_dataset(tmp_path / "bigglm-demo" / "data", n_scans=40)  # where the config points
    report = _fresh(CLI, "validate", str(config))
    assert report["status"] == 0, report["stderr"]
    assert _among(report["loaded"], ("pandas",)) != []  # the check can see what it forbids
    assert _among(report["loaded"], NOT_FOR_VALIDATE) == []


def test_validate_errors_load_no_dask_array(tmp_path: Path) -> None:
    """An invalid config needs only pydantic and yaml; missing inputs no array library."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: {runs: [{bold: b.nii}]}\noutputs: {folder: o}\nmodel: {noise: ar 1}\n")
    report = _fresh(CLI, "validate", str(bad))
    assert report["status"] == 2
    assert "model.noise: 'ar 1' is not a noise model" in report["stderr"]
    assert (
        _among(report["loaded"], tuple(lib for lib in HEAVY if lib not in ("pydantic", "yaml")))
        == []
    )

    local = ROOT / "configs" / "local.yaml"
    if Path("/data/ds000117").exists():  # pragma: no cover - the example dataset is here
        pytest.skip(f"{local}'s inputs exist on this machine")
    report = _fresh(CLI, "validate", str(local))
    assert report["status"] == 2
    assert report["stderr"].count("\n") == 1 and "is not a folder" in report["stderr"]
    assert _among(report["loaded"], NOT_FOR_VALIDATE) == []
