"""Find a TRELLIS checkout and import its model code without running ``trellis/__init__.py``.

TRELLIS is not on PyPI: a user points ``JUDGE3D_TRELLIS_SRC`` at a checkout of
github.com/microsoft/TRELLIS (the folder that holds ``trellis/``), or has ``trellis`` importable.
``trellis/__init__.py`` imports the pipelines, which import torchvision and rembg; the backend needs
only ``trellis.models``, ``trellis.modules``, ``trellis.pipelines.samplers`` and
``trellis.representations``, so the package is registered bare (its ``__path__`` only) and those
submodules are imported from it. ``trellis.pipelines`` is registered bare too, for the same reason.

TRELLIS reads its attention backends from the environment when ``trellis.modules`` is first
imported: ``ATTN_BACKEND`` (dense: flash_attn, xformers or sdpa) and ``SPARSE_ATTN_BACKEND``
(sparse: flash_attn or xformers); set them before the first import.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ENV_VAR = "JUDGE3D_TRELLIS_SRC"
PATCHES_ENV_VAR = "JUDGE3D_TRELLIS_PATCHES"     # a site's fixes around TRELLIS (see _site_patches)
PATCHES_MODULE = "judge3d_trellis_site_patches"
REQUIREMENTS = "spconv (CPU: `pip install 'judge3d[trellis-cpu]'`; GPU: spconv-cu126 or the build for your CUDA), easydict, plyfile"

# What to install for each module TRELLIS's model code imports.
INSTALL_HINTS = {
    "spconv": "pip install spconv-cu126 (GPU; pick your CUDA) or spconv==2.3.8 (CPU: pip install 'judge3d[trellis-cpu]')",
    "cumm": "it comes with spconv: reinstall spconv",
    "easydict": "pip install easydict (or 'judge3d[trellis-cpu]')",
    "plyfile": "pip install plyfile (or 'judge3d[trellis-cpu]')",
    "utils3d": "TRELLIS's utils3d: pip install git+https://github.com/EasternJournalist/utils3d.git "
               "(not PyPI's package of that name)",
    "flash_attn": "pip install flash-attn, or use another attention backend: ATTN_BACKEND=xformers|sdpa for "
                  "dense attention and SPARSE_ATTN_BACKEND=xformers for sparse attention",
    "xformers": "pip install xformers (matching your torch), or ATTN_BACKEND/SPARSE_ATTN_BACKEND=flash_attn",
    "kaolin": "FlexiCubes imports kaolin.utils.testing.check_tensor: install kaolin (NVIDIA's wheels for your torch)",
}


class TrellisUnavailable(ImportError):
    """TRELLIS's source or one of its dependencies is missing; the message says what to do."""


@dataclass(frozen=True)
class TrellisModules:
    source: Path                # the folder holding trellis/
    models: ModuleType          # trellis.models (from_pretrained, the model classes)
    modules: ModuleType         # trellis.modules
    sparse: ModuleType          # trellis.modules.sparse (SparseTensor)
    samplers: ModuleType        # trellis.pipelines.samplers
    representations: ModuleType  # trellis.representations


def trellis_source() -> Path:
    """The folder holding ``trellis/``: ``$JUDGE3D_TRELLIS_SRC``, else wherever ``trellis`` is importable."""
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not (root / "trellis" / "__init__.py").is_file():
            raise TrellisUnavailable(
                f"{ENV_VAR}={env} does not hold a TRELLIS checkout (no trellis/__init__.py there); point it at a "
                "clone of github.com/microsoft/TRELLIS (the folder that holds trellis/).")
        return root.resolve()
    loaded = sys.modules.get("trellis")
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0]).resolve().parent
    spec = importlib.util.find_spec("trellis")      # finds the top-level package without running it
    if spec is None or not spec.submodule_search_locations:
        raise TrellisUnavailable(
            f"TRELLIS source not found: set {ENV_VAR} to a clone of github.com/microsoft/TRELLIS (the folder that "
            f"holds trellis/), or put trellis on PYTHONPATH. Its model code also needs {REQUIREMENTS}.")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def _register_bare_package(name: str, path: Path) -> None:
    """Put ``name`` in sys.modules as a package whose submodules load from ``path``, without
    executing its ``__init__.py``."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module = importlib.util.module_from_spec(spec)
    module.__file__ = None
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def _missing_dependency(exc: ModuleNotFoundError, source: Path) -> TrellisUnavailable:
    top = (exc.name or "").split(".")[0]
    hint = INSTALL_HINTS.get(top, f"pip install {top}")
    return TrellisUnavailable(f"TRELLIS at {source} (from {ENV_VAR} or PYTHONPATH) needs the Python module "
                              f"{exc.name!r}: {hint}. Its model code needs {REQUIREMENTS}.")


def _site_patches() -> ModuleType | None:
    """The Python file ``$JUDGE3D_TRELLIS_PATCHES`` names, imported once, before TRELLIS.

    A site's own fixes around TRELLIS (a machine without flash_attn/xformers, a CPU-only CI): its
    module code runs before TRELLIS's first import (set attention backends, provide a module), and its
    ``after_import(modules)``, if any, runs once TRELLIS is imported. The test suite's CPU stand-ins
    reach the paper-smoke pipeline's stage processes this way; nothing is patched when it is unset."""
    path = os.environ.get(PATCHES_ENV_VAR)
    if not path:
        return None
    if PATCHES_MODULE in sys.modules:
        return sys.modules[PATCHES_MODULE]
    file = Path(path).expanduser()
    if not file.is_file():
        raise TrellisUnavailable(f"{PATCHES_ENV_VAR}={path} names no file; point it at a Python file, or unset it")
    spec = importlib.util.spec_from_file_location(PATCHES_MODULE, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[PATCHES_MODULE] = module
    spec.loader.exec_module(module)
    return module


def import_trellis() -> TrellisModules:
    """Import TRELLIS's model code (see the module docstring); raises :class:`TrellisUnavailable`
    naming the env var and what to install when something is missing."""
    patches = _site_patches()
    first = "trellis.models" not in sys.modules
    source = trellis_source()
    package = source / "trellis"
    loaded = sys.modules.get("trellis")
    if loaded is None:
        _register_bare_package("trellis", package)
    elif Path(list(getattr(loaded, "__path__", [""]))[0]).resolve() != package.resolve():
        raise TrellisUnavailable(f"a different `trellis` package is already imported ({list(loaded.__path__)}); "
                                 f"{ENV_VAR} asks for {package}")
    if "trellis.pipelines" not in sys.modules:
        _register_bare_package("trellis.pipelines", package / "pipelines")
    try:
        models = importlib.import_module("trellis.models")
        modules = importlib.import_module("trellis.modules")
        sparse = importlib.import_module("trellis.modules.sparse")
        samplers = importlib.import_module("trellis.pipelines.samplers")
        representations = importlib.import_module("trellis.representations")
        # The model classes load lazily through trellis.models.__getattr__; load them now, so a
        # missing dependency surfaces here with its hint rather than inside from_pretrained.
        for name in ("SparseStructureFlowModel", "SparseStructureDecoder", "SparseStructureEncoder",
                     "SLatFlowModel", "SLatMeshDecoder"):
            getattr(models, name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "trellis":
            raise TrellisUnavailable(f"{package} is not a complete TRELLIS checkout ({exc}); point {ENV_VAR} at a "
                                     "clone of github.com/microsoft/TRELLIS with its submodules") from exc
        raise _missing_dependency(exc, source) from exc
    imported = TrellisModules(source, models, modules, sparse, samplers, representations)
    if first and patches is not None and hasattr(patches, "after_import"):
        patches.after_import(imported)
    return imported
