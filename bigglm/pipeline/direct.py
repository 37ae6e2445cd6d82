"""``bigglm fit``: fit converted stores with events, confounds and contrasts, no YAML."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigglm.exceptions import ConfigError, DesignError
from bigglm.glm.contrasts import default_kind, label, map_file_name, map_stat
from bigglm.io.artefacts import check_outside_stores, check_replaceable
from bigglm.typing import ContrastKind

__all__ = ["fit_stores", "parse_contrast_options"]

logger = logging.getLogger(__name__)


def parse_contrast_options(options: Sequence[str]) -> dict[str, str | list[str]]:
    """``["name=expr", "F=a;b"]`` -> ``{"name": "expr", "F": ["a", "b"]}`` (``;`` makes F).

    Parameters
    ----------
    options : sequence of str
        ``NAME=EXPRESSION`` items; rows separated by ``;`` make an F contrast.

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        For an item without ``=`` or with an empty name or expression, a name given
        twice, or names refused by :func:`bigglm.glm.contrasts.check_names` (a path
        separator or ``..``, two names with the same file label).

    Examples
    --------
    >>> parse_contrast_options(["d=faces - houses", "any=faces; houses"])
    {'d': 'faces - houses', 'any': ['faces', 'houses']}
    >>> parse_contrast_options(["d=faces", "d=houses"])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: contrasts 'd=houses': the name 'd' is given twice; ...
    """
    from bigglm.glm.contrasts import check_names

    out: dict[str, str | list[str]] = {}
    for option in options:
        name, sep, expression = option.partition("=")
        name = name.strip()
        rows = [row.strip() for row in expression.split(";") if row.strip()]
        if not sep or not name or not rows:
            raise ConfigError(
                f"contrasts {option!r}: write NAME=EXPRESSION, e.g. "
                "'faces_minus_houses=faces - houses'"
            )
        if name in out:
            raise ConfigError(
                f"contrasts {option!r}: the name {name!r} is given twice; give each "
                "contrast its own name"
            )
        out[name] = rows[0] if len(rows) == 1 else rows
    try:
        check_names(out)
    except DesignError as err:
        raise ConfigError(f"contrasts: {err}") from None
    return out


def _check_contrasts(named: dict[str, str | list[str]], designs: Sequence[Any]) -> None:
    """Parse each contrast against each design before the fit (cheap; the fit is not)."""
    from bigglm.glm import contrasts as con

    for name, spec in named.items():
        for design in designs:
            columns = [str(c) for c in design.columns]
            con.estimable_contrast(spec, design.to_numpy(np.float64), columns, name=name)


def _profile(address: str | None, tls: Mapping[str, str] | None) -> Any:
    from bigglm.config import ClusterConfig, parse_section

    if address is None:
        if tls:
            raise ConfigError("tls settings need the address of the scheduler they are for")
        return ClusterConfig()
    section = {"profile": "address", "address": address, "security": dict(tls or {})}
    return parse_section(ClusterConfig, section)


def _per_store(values: Sequence[Path] | None, n: int, option: str) -> list[Path | None]:
    if not values:
        return [None] * n
    if len(values) != n:
        raise ConfigError(f"{option}: got {len(values)} files for {n} stores; give one per store")
    return list(values)


def fit_stores(
    stores: Sequence[Path],
    output: Path,
    *,
    events: Sequence[Path] | None = None,
    confounds: Sequence[Path] | None = None,
    confound_columns: Sequence[str] | None = None,
    contrasts: Sequence[str] = (),
    noise: str = "ar1",
    hrf: str = "glover",
    drift: str | None = "cosine",
    high_pass: float = 0.01,
    slice_time_ref: float = 0.0,
    address: str | None = None,
    tls: Mapping[str, str] | None = None,
    residuals: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Fit converted stores (one subject's runs) and write each contrast's maps.

    The ``bigglm fit`` command: designs are built from the stores' TR and length and the
    given events and confounds, the runs are fitted together, and for every contrast the
    effect, variance, t or F, and z maps (for F, effect and variance with one volume per
    row) are written to ``output`` (``contrast-<label>_stat-<stat>_statmap.nii.gz``, by
    :func:`bigglm.glm.contrasts.map_file_name`), with the result store ``glm.zarr``.

    Parameters
    ----------
    stores : sequence of Path
        Stores from :func:`bigglm.convert`, all on one grid.
    output : Path
        Folder for the maps (created).
    events, confounds : sequence of Path, optional
        One file per store.
    confound_columns : sequence of str, optional
        Confound columns (names or globs); all when omitted.
    contrasts : sequence of str
        ``NAME=EXPRESSION`` items (see :func:`parse_contrast_options`).
    noise, hrf, drift, high_pass, slice_time_ref
        As in the YAML ``model`` section (``drift="none"``: no drift terms).
    address : str, optional
        A Dask scheduler; default a local cluster sized to the machine (TLS, loopback).
    tls : mapping, optional
        For a ``tls://`` ``address``: ``ca_file``, ``cert`` and ``key``, the PEM files of
        the client's credentials (as the YAML's ``cluster.security``); default: Dask's
        ``distributed.comm.tls`` configuration.
    residuals : {"raw", "whitened"}, optional
        Also write each run's residuals as ``<store name>_desc-residuals_bold.nii.gz``
        (``desc-whitenedResiduals`` for whitened): a second pass over the data.
    overwrite : bool
        Replace outputs bigglm wrote before in ``output``; otherwise any existing output
        is refused before anything is fitted. A file or folder bigglm did not write at
        an output's path is always refused.

    Returns
    -------
    list of Path
        The maps written (and the residual images).

    Raises
    ------
    ConfigError, DesignError, StoreError
        For bad options, files or stores; StoreError for an output path that is taken
        (see ``overwrite``).

    Examples
    --------
    >>> fit_stores([Path("/nope.zarr")], Path("/tmp/o"), contrasts=["a"])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: contrasts 'a': write NAME=EXPRESSION, ...
    """
    from bigglm.cluster import client_from_profile
    from bigglm.config import ModelConfig, parse_section
    from bigglm.design import make_run_design
    from bigglm.glm import fit
    from bigglm.glm.result import contrast_maps
    from bigglm.io import open_run, to_nifti

    named = parse_contrast_options(contrasts)
    if residuals not in (None, "raw", "whitened"):
        raise ConfigError(f"residuals={residuals!r}: use 'raw' or 'whitened'")
    options = {"noise": noise, "hrf": hrf, "drift": None if drift == "none" else drift}
    model = parse_section(ModelConfig, {**options, "high_pass": high_pass})
    runs = [open_run(s) for s in stores]
    event_files = _per_store(events, len(runs), "events")
    confound_files = _per_store(confounds, len(runs), "confounds")
    designs = [
        make_run_design(
            ds.sizes["time"],
            float(ds.attrs["tr"]),
            events=ev,
            confounds=cf,
            confound_columns=confound_columns,
            slice_time_ref=slice_time_ref,
            hrf=model.hrf,
            drift=model.drift,
            high_pass=model.high_pass,
        )
        for ds, ev, cf in zip(runs, event_files, confound_files, strict=True)
    ]
    _check_contrasts(named, designs)
    profile = _profile(address, tls)
    check_outside_stores(output / "glm.zarr")  # before the folder is made, inside a store
    output.mkdir(parents=True, exist_ok=True)
    prefixes = [Path(store).name.removesuffix(".zarr") for store in stores]
    for path, artefact in _outputs(output, named, prefixes, residuals):
        check_replaceable(path, artefact, overwrite=overwrite)
    written: list[Path] = []
    with client_from_profile(profile) as client:
        result = fit(runs, designs, noise=model.noise, client=client).compute()
        if residuals is not None:
            written += result.write_residuals(
                output,
                prefixes,
                whitened=residuals == "whitened",
                overwrite=overwrite,
                client=client,
            )
    result.to_zarr(output / "glm.zarr", overwrite=overwrite)
    for name, expression in named.items():
        kind: ContrastKind = default_kind(expression)
        images = contrast_maps(result.contrast(expression, kind=kind))
        for stat, path in _map_paths(output, name, expression).items():
            written.append(to_nifti(images[stat], stores[0], path, overwrite=overwrite))
    return written


#: The maps ``bigglm fit`` writes per contrast (``stat``: the t or F map).
_MAP_STATS = ("effect", "variance", "stat", "z")


def _map_paths(output: Path, name: str, expression: str | list[str]) -> dict[str, Path]:
    """A contrast's map files by map name, named as the Python API names them."""
    kind = default_kind(expression)
    return {
        stat: output / map_file_name("", label(name), map_stat(stat, kind)) for stat in _MAP_STATS
    }


def _outputs(
    output: Path, named: Mapping[str, Any], prefixes: Sequence[str], residuals: str | None
) -> list[tuple[Path, str]]:
    """Every path :func:`fit_stores` writes, with the kind of artefact it holds."""
    from bigglm.glm.residuals import file_name

    paths = [(output / "glm.zarr", "glm-result")]
    paths += [
        (path, "image") for n, e in named.items() for path in _map_paths(output, n, e).values()
    ]
    if residuals is not None:
        whitened = residuals == "whitened"
        paths += [
            (output / file_name(p, whitened=whitened, format="nifti"), "image") for p in prefixes
        ]
    return paths
