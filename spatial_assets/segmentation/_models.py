"""StarDist models: registry names (downloaded once by StarDist) and local model folders, validated before use."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..io._readers import InputError

#: Prefix of a model bundled with the package: ``bundled:<folder name under spatial_assets/segmentation/models>``.
BUNDLED_PREFIX = "bundled:"
#: The bundled model the demo uses (a StarDist2D folder trained here; see its training_info.json).
BUNDLED_MODEL = BUNDLED_PREFIX + "stardist_nuclei"
#: The bundled RGB model for H&E (trained here on H&E-like renders of real nuclear masks; see its README.md): the
#: one to configure where StarDist's registry model ``2D_versatile_he`` cannot be downloaded.
BUNDLED_HE_MODEL = BUNDLED_PREFIX + "stardist_he"


def bundled_models() -> dict[str, Path]:
    """The StarDist model folders shipped in the package, by name (found with importlib.resources).

    Returns
    -------
    dict
        ``{folder name: folder path}`` of the bundled folders holding a ``config.json`` (empty if none).
    """
    root = Path(str(files("spatial_assets.segmentation").joinpath("models")))
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").exists()} if root.is_dir() else {}


class ModelUnavailableError(InputError):
    """The configured StarDist model cannot be obtained (offline registry, missing or invalid folder)."""


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
_GUIDANCE = (
    "Configure a local StarDist model folder (parameters.segmentation.model: path/to/folder, or a model "
    f"bundled with the package: '{BUNDLED_HE_MODEL}' for H&E RGB, '{BUNDLED_MODEL}' for a nuclear channel), or use parameters.segmentation.method: watershed, "
    "or opt in to a fallback with parameters.segmentation.fallback: watershed."
)


_MODEL_CACHE: dict[tuple, tuple[Any, dict]] = {}


def _registry_names() -> tuple[set[str], dict[str, str]]:
    from csbdeep.models.pretrained import get_registered_models
    from stardist.models import StarDist2D

    keys, aliases = get_registered_models(StarDist2D)
    alias_of = {a: k for k, al in aliases.items() for a in al}
    return set(keys), alias_of


def _resolve_folder(spec: str) -> Path | None:
    """A bundled model (``bundled:<name>``) or an existing folder (relative paths: to the working directory)."""
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        models = bundled_models()
        if name not in models:
            raise ModelUnavailableError(
                f"segmentation model '{spec}': no bundled model '{name}' (bundled: {sorted(models)}). {_GUIDANCE}"
            )
        return models[name]
    p = Path(spec).expanduser()
    return p.resolve() if p.exists() else None


def validate_model_folder(folder: str | os.PathLike) -> dict:
    """Check a StarDist model folder (config.json of a StarDist2D model + ``*.h5`` weights); return its config.

    Parameters
    ----------
    folder : str or os.PathLike
        The model folder.

    Returns
    -------
    dict
        The parsed ``config.json``.

    Raises
    ------
    ModelUnavailableError
        If the folder does not exist, lacks a valid StarDist2D ``config.json`` or has no ``*.h5`` / ``*.hdf5``
        weights.
    """
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelUnavailableError(f"segmentation model folder {folder}: not a directory. {_GUIDANCE}")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelUnavailableError(
            f"segmentation model folder {folder}: not a StarDist model (no config.json "
            f"found; expected config.json and weights_best.h5). {_GUIDANCE}"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except Exception as e:
        raise ModelUnavailableError(
            f"segmentation model folder {folder}: config.json is not valid JSON ({e}). {_GUIDANCE}"
        ) from None
    missing = [k for k in ("n_rays", "n_channel_in", "grid") if k not in cfg]
    if missing or cfg.get("n_dim", 2) != 2:
        raise ModelUnavailableError(
            f"segmentation model folder {folder}: config.json is not a StarDist2D config "
            f"(missing {missing}, n_dim {cfg.get('n_dim')}). {_GUIDANCE}"
        )
    if not (list(folder.glob("*.h5")) or list(folder.glob("*.hdf5"))):
        raise ModelUnavailableError(
            f"segmentation model folder {folder}: not a StarDist model (no weights: expected "
            f"weights_best.h5 next to config.json). {_GUIDANCE}"
        )
    return cfg


def load_stardist_model(spec: str) -> tuple[Any, dict]:
    """Load a StarDist2D model from a registry name or a local folder; returns (model, info). Cached per spec.

    Raises :class:`ModelUnavailableError` saying why and how to configure another model; never falls back.

    Parameters
    ----------
    spec : str
        A StarDist registry name or alias (e.g. ``2D_versatile_he``), a bundled model (``bundled:<name>``) or a
        local model folder (relative to the working directory).

    Returns
    -------
    tuple
        ``(model, info)``: the StarDist2D model and a dict with ``model``, ``model_source``, ``model_path``,
        ``n_channel_in``, ``n_rays``, ``grid`` and ``stardist_version``.

    Raises
    ------
    ModelUnavailableError
        If ``spec`` is neither a registry name nor an existing folder, the folder is invalid or cannot be loaded,
        or the registry model cannot be obtained.
    """
    folder = _resolve_folder(spec)
    keys, alias_of = _registry_names()
    cfg = folder / "config.json" if folder else None
    key = (str(folder), cfg.stat().st_mtime if cfg.exists() else None) if cfg else ("registry", spec)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    from stardist.models import StarDist2D

    quiet = io.StringIO()
    if folder is not None:
        validate_model_folder(folder)
        try:
            with contextlib.redirect_stdout(quiet):
                model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
        except Exception as e:
            raise ModelUnavailableError(
                f"segmentation model folder {folder}: could not be loaded as a StarDist2D "
                f"model ({type(e).__name__}: {e}). {_GUIDANCE}"
            ) from None
        model.basedir = None  # read-only: never write thresholds into the model folder
        info = {"model": spec, "model_source": "folder", "model_path": str(folder)}
    elif spec in keys or spec in alias_of:
        name = alias_of.get(spec, spec)
        cache_dir = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / "StarDist2D" / name
        existed = cache_dir.exists()
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                model = StarDist2D.from_pretrained(name)
            if model is None:
                raise RuntimeError("not found in the registry")
        except Exception as e:
            if not existed and cache_dir.is_dir() and not any(cache_dir.iterdir()):
                shutil.rmtree(cache_dir, ignore_errors=True)  # failed download leaves an empty folder behind
            raise ModelUnavailableError(
                f"segmentation model '{spec}': could not be obtained from StarDist's registry ({type(e).__name__}: "
                f"{e}); it is downloaded once into ~/.keras/models/StarDist2D and needs the internet. "
                f"{_GUIDANCE}"
            ) from None
        info = {"model": spec, "model_source": "registry", "model_path": str(cache_dir)}
    else:
        raise ModelUnavailableError(
            f"segmentation model '{spec}': neither a StarDist registry name (known: {sorted(keys)}) nor an existing "
            f"model folder (looked in {Path.cwd()}). {_GUIDANCE}"
        )
    import stardist

    info.update(
        n_channel_in=int(model.config.n_channel_in),
        n_rays=int(model.config.n_rays),
        grid=list(model.config.grid),
        stardist_version=stardist.__version__,
    )
    _MODEL_CACHE[key] = (model, info)
    return model, info
