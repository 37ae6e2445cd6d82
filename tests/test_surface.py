"""Surfaces and grayordinates: GIFTI and CIFTI-2 series in, the same fit, maps out, mesh inference.

References, none written here except plain loops stated as such:

* nilearn's FirstLevelModel on a SurfaceImage on nilearn's fsaverage5 mesh (OLS): t and
  z to 1e-5 relative (both exact OLS; the bound leaves room for float32 data and
  nilearn's own float handling);
* nibabel's CIFTI-2 axes: brain models compared with ``BrainModelAxis.__eq__``, data
  exactly (float32 in, float32 out);
* the same fit done on the parts of a CIFTI file as real GIFTI and NIfTI files: 1e-9
  relative (the same float32 numbers, summed in other chunk orders);
* scipy.sparse.csgraph.connected_components on the mesh graph built plainly from the
  triangles with scipy.sparse; a plain stepped TFCE over csgraph components: 1e-9
  relative (sums of the same terms in another order).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import xarray as xr
from nibabel.cifti2 import cifti2_axes
from scipy.sparse.csgraph import connected_components

import bigglm
from bigglm.exceptions import BigGLMWarning, StoreError
from bigglm.inference import spatial
from bigglm.inference.meshes import mesh_adjacency, surface_clusters_table
from bigglm.io.artefacts import kind_of

pytestmark = [
    pytest.mark.usefixtures("threads_scheduler"),
    pytest.mark.filterwarnings("ignore:.*Generation of a mask has been requested"),
]

TR = 2.0
N_SCANS = 48
HEMIS = {"L": "left", "R": "right"}


# --- fixtures --------------------------------------------------------------------------


def design(n_scans: int = N_SCANS) -> pd.DataFrame:
    t = np.arange(n_scans)
    return pd.DataFrame(
        {
            "a": (t // 6 % 2 == 0).astype(float),
            "b": (t // 8 % 2 == 0).astype(float),
            "drift": np.cos(np.pi * (t + 0.5) / n_scans),
            "constant": 1.0,
        }
    )


def write_series(path: Path, data: np.ndarray, hemi: str, time_step: str | None = None) -> Path:
    """A GIFTI functional series as fMRIPrep writes it: one data array per time point."""
    structure = {"L": "CortexLeft", "R": "CortexRight"}[hemi]
    image = nib.GiftiImage(meta=nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": structure}))
    for row in np.asarray(data, dtype=np.float32):
        meta = nib.gifti.GiftiMetaData({"TimeStep": time_step} if time_step else {})
        image.add_gifti_data_array(
            nib.gifti.GiftiDataArray(row, intent="NIFTI_INTENT_TIME_SERIES", meta=meta)
        )
    nib.save(image, path)
    return path


def write_mesh(path: Path, coordinates: np.ndarray, faces: np.ndarray) -> Path:
    image = nib.GiftiImage()
    image.add_gifti_data_array(
        nib.gifti.GiftiDataArray(coordinates.astype(np.float32), intent="NIFTI_INTENT_POINTSET")
    )
    image.add_gifti_data_array(
        nib.gifti.GiftiDataArray(faces.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE")
    )
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic run on nilearn's fsaverage5 pial mesh, its medial wall constant 0."""
    from nilearn.datasets import load_fsaverage

    tmp = tmp_path_factory.mktemp("surface")
    mesh = load_fsaverage("fsaverage5")["pial"]
    rng = np.random.default_rng(17)
    x = design().to_numpy()
    out: dict = {"tmp": tmp, "mesh": mesh, "data": {}, "keep": {}, "files": {}, "meshes": {}}
    for hemi, part in HEMIS.items():
        coords = np.asarray(mesh.parts[part].coordinates)
        faces = np.asarray(mesh.parts[part].faces)
        medial = (
            coords[:, 0] > np.quantile(coords[:, 0], 0.9)
            if hemi == "L"
            else (coords[:, 0] < np.quantile(coords[:, 0], 0.1))
        )
        n = len(coords)
        beta = rng.normal(size=(x.shape[1], n)) * np.array([[2.0], [1.0], [3.0], [0.0]])
        y = 800.0 + x @ beta + rng.normal(size=(N_SCANS, n))
        y[:, medial] = 0.0
        out["data"][hemi] = y.astype(np.float32)
        out["keep"][hemi] = ~medial
        out["files"][hemi] = write_series(tmp / f"sub-01_hemi-{hemi}_bold.func.gii", y, hemi)
        out["meshes"][hemi] = write_mesh(tmp / f"{hemi.lower()}h.pial.surf.gii", coords, faces)
    out["store"] = bigglm.convert(
        [out["files"]["R"], out["files"]["L"]], tmp / "run.zarr", tr=TR, time_chunk=20
    )
    return out


def kept(run: dict, values: dict[str, np.ndarray]) -> np.ndarray:
    """Per-vertex values of both hemispheres, at the store's columns (L kept, then R kept)."""
    return np.concatenate([values[h][..., run["keep"][h]] for h in HEMIS], axis=-1)


# --- ingest ----------------------------------------------------------------------------


def test_gifti_pair_is_one_vertex_store_without_the_medial_wall(run: dict) -> None:
    ds = bigglm.open_run(run["store"])
    assert ds.attrs["geometry"] == "vertex"
    assert ds.attrs["hemispheres"] == {"L": 10242, "R": 10242}
    assert "mask" not in ds and "i" not in ds.coords
    np.testing.assert_array_equal(ds["bold"].values, kept(run, run["data"]))
    np.testing.assert_array_equal(
        ds["vertex"].values, np.concatenate([np.flatnonzero(run["keep"][h]) for h in HEMIS])
    )
    np.testing.assert_array_equal(
        ds["hemisphere"].values, np.repeat([0, 1], [run["keep"][h].sum() for h in HEMIS])
    )
    np.testing.assert_array_equal(ds["time"].values, np.arange(N_SCANS) * TR)
    bigglm.io.store.verify_store(run["store"], full=True)


def test_a_mapping_and_a_given_mask_choose_the_vertices(run: dict) -> None:
    mask = {h: np.zeros(10242, bool) for h in HEMIS}
    mask["L"][:50], mask["R"][-30:] = True, True
    store = bigglm.convert(
        {"L": run["files"]["L"], "R": run["files"]["R"]},
        run["tmp"] / "masked.zarr",
        tr=TR,
        mask=mask,
    )
    ds = bigglm.open_run(store)
    np.testing.assert_array_equal(
        ds["bold"].values, np.concatenate([run["data"]["L"][:, :50], run["data"]["R"][:, -30:]], 1)
    )


def test_convert_many_takes_surface_runs(run: dict, cifti: dict) -> None:
    pair = [run["files"]["L"], run["files"]["R"]]
    stores = [run["tmp"] / "many-gifti.zarr", run["tmp"] / "many-cifti.zarr"]
    paths = bigglm.convert_many([pair, cifti["path"]], stores, tr=TR)
    assert [bigglm.open_run(p).attrs["geometry"] for p in paths] == ["vertex", "grayordinate"]


def test_the_command_line_converts_surface_runs(run: dict, cifti: dict) -> None:
    from bigglm.cli import main

    left, right = (str(run["files"][h]) for h in HEMIS)
    assert (
        main(["convert", left, right, "--store", str(run["tmp"] / "cli-g.zarr"), "--tr", "2"]) == 0
    )
    assert main(["convert", str(cifti["path"]), "--store", str(run["tmp"] / "cli-c.zarr")]) == 0
    assert bigglm.open_run(run["tmp"] / "cli-c.zarr").attrs["geometry"] == "grayordinate"


def test_hemispheres_are_told_by_gifti_metadata(run: dict) -> None:
    tmp = run["tmp"]
    left = write_series(tmp / "left.func.gii", run["data"]["L"][:, :20], "L")
    right = write_series(tmp / "right.func.gii", run["data"]["R"][:, :30], "R")
    ds = bigglm.open_run(bigglm.convert([right, left], tmp / "meta.zarr", tr=TR))
    assert ds.attrs["hemispheres"] == {"L": 20, "R": 30}
    plain = tmp / "plain.func.gii"
    image = nib.GiftiImage()
    image.add_gifti_data_array(nib.gifti.GiftiDataArray(np.ones(5, np.float32)))
    nib.save(image, plain)
    with pytest.raises(StoreError, match="cannot tell its hemisphere"):
        bigglm.convert([plain, left], tmp / "bad.zarr", tr=TR)


# --- first level against nilearn -------------------------------------------------------


def test_ols_on_fsaverage5_matches_nilearn_first_level_model(run: dict) -> None:
    from nilearn.glm.first_level import FirstLevelModel
    from nilearn.surface import SurfaceImage

    mesh = run["mesh"]
    image = SurfaceImage(mesh, {part: run["data"][h].T for h, part in HEMIS.items()})
    mask = SurfaceImage(mesh, {part: run["keep"][h] for h, part in HEMIS.items()})
    model = FirstLevelModel(
        noise_model="ols", signal_scaling=False, mask_img=mask, minimize_memory=False
    )
    model.fit(image, design_matrices=design())
    expected = model.compute_contrast("a - b", output_type="all")
    ours = bigglm.fit(run["store"], design(), noise="ols").contrast("a - b")
    for theirs, mine in (("stat", "stat"), ("z_score", "z"), ("effect_size", "effect")):
        parts = {h: np.asarray(expected[theirs].data.parts[p]) for h, p in HEMIS.items()}
        np.testing.assert_allclose(ours[mine].values, kept(run, parts), rtol=1e-5)


# --- maps out --------------------------------------------------------------------------


def test_gifti_maps_round_trip_exactly(run: dict) -> None:
    ds = bigglm.open_run(run["store"])
    bold = ds["bold"].values
    out = bigglm.to_gifti(bold[:3], run["store"], run["tmp"] / "sub-01_hemi-L_bold3.shape.gii")
    assert out["R"].name == "sub-01_hemi-R_bold3.shape.gii"
    for hemi in HEMIS:
        image = nib.load(out[hemi])
        assert image.meta["AnatomicalStructurePrimary"] == f"Cortex{HEMIS[hemi].title()}"
        maps = np.stack([d.data for d in image.darrays])
        np.testing.assert_array_equal(
            maps[:, run["keep"][hemi]], run["data"][hemi][:3, run["keep"][hemi]]
        )
        assert np.isnan(maps[:, ~run["keep"][hemi]]).all()
    # the store built from the written maps holds them again, exactly
    again = bigglm.convert(out, run["tmp"] / "again.zarr", tr=TR)
    np.testing.assert_array_equal(bigglm.open_run(again)["bold"].values, bold[:3])


def test_gifti_outputs_replace_only_what_bigglm_wrote(run: dict) -> None:
    z = bigglm.fit(run["store"], design()).contrast("a")["z"]
    paths = {h: run["tmp"] / f"z_hemi-{h}.shape.gii" for h in HEMIS}
    bigglm.to_gifti(z, run["store"], paths)
    with pytest.raises(StoreError, match="overwrite"):
        bigglm.to_gifti(z, run["store"], paths)
    bigglm.to_gifti(z, run["store"], paths, overwrite=True)
    foreign = run["tmp"] / "mine_hemi-R.shape.gii"
    nib.save(nib.GiftiImage(), foreign)  # a GIFTI bigglm did not write
    with pytest.raises(
        StoreError, match=r"mine_hemi-R\.shape\.gii: exists and is a file not written"
    ):
        bigglm.to_gifti(z, run["store"], run["tmp"] / "mine_hemi-{hemi}.shape.gii", overwrite=True)
    assert not (run["tmp"] / "mine_hemi-L.shape.gii").exists()  # refused before any write
    assert nib.load(foreign).darrays == []


def test_a_vertex_store_maps_to_a_valid_cifti_dscalar(run: dict) -> None:
    z = bigglm.fit(run["store"], design()).contrast("a")["z"].values
    path = bigglm.to_cifti(z, run["store"], run["tmp"] / "z.dscalar.nii", names=["z"])
    image = nib.load(path)
    models = image.header.get_axis(1)
    assert image.nifti_header.get_intent()[0] == "ConnDenseScalar"
    assert kind_of(path) == "image"  # bigglm's marker, in the NIfTI-2 header's descrip
    assert image.header.get_axis(0).name.tolist() == ["z"]
    np.testing.assert_array_equal(np.asarray(image.dataobj)[0], z.astype(np.float32))
    left = models.vertex[models.name == "CIFTI_STRUCTURE_CORTEX_LEFT"]
    np.testing.assert_array_equal(left, np.flatnonzero(run["keep"]["L"]))
    assert models.nvertices == {
        "CIFTI_STRUCTURE_CORTEX_LEFT": 10242,
        "CIFTI_STRUCTURE_CORTEX_RIGHT": 10242,
    }


def test_a_surface_result_writes_bids_named_gifti_maps(run: dict) -> None:
    result = bigglm.fit(run["store"], design())
    folder = run["tmp"] / "maps"
    files = result.to_nifti(folder, {"aMinusB": "a - b"}, prefix="sub-01_space-fsaverage5")
    name = "sub-01_hemi-{}_space-fsaverage5_contrast-aMinusB_stat-z_statmap.shape.gii"
    assert {folder / name.format(h) for h in HEMIS} <= set(files)
    assert len(files) == 10  # effect, variance, t, p, z for each hemisphere
    z = result.contrast("a - b")["z"].values
    maps = {h: nib.load(folder / name.format(h)).darrays[0].data for h in HEMIS}
    np.testing.assert_array_equal(kept(run, maps), z.astype(np.float32))


# --- CIFTI -----------------------------------------------------------------------------

VOLUME = (5, 5, 4)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def cifti(run: dict) -> dict:
    """A dense series of the run's cortex (its kept vertices) and a thalamus of 18 voxels."""
    tmp = run["tmp"]
    thalamus = np.zeros(VOLUME, bool)
    thalamus[1:4, 1:4, 1:3] = True
    rng = np.random.default_rng(3)
    x = design().to_numpy()
    voxels = (
        500.0
        + x @ rng.normal(size=(4, int(thalamus.sum())))
        + rng.normal(size=(N_SCANS, int(thalamus.sum())))
    )
    models = (
        cifti2_axes.BrainModelAxis.from_mask(run["keep"]["L"], "CortexLeft")
        + cifti2_axes.BrainModelAxis.from_mask(run["keep"]["R"], "CortexRight")
        + cifti2_axes.BrainModelAxis.from_mask(thalamus, "thalamus_left", affine=AFFINE)
    )
    data = np.concatenate([kept(run, run["data"]), voxels.astype(np.float32)], axis=1)
    image = nib.Cifti2Image(data, header=(cifti2_axes.SeriesAxis(0.0, TR, N_SCANS), models))
    image.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SERIES")
    path = tmp / "sub-01_space-fsLR_den-91k_bold.dtseries.nii"
    nib.save(image, path)
    volume = np.zeros((*VOLUME, N_SCANS), np.float32)
    volume[thalamus] = voxels.T
    nifti = tmp / "thalamus.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), nifti)
    store = bigglm.convert(path, tmp / "cifti.zarr", time_chunk=20, voxel_chunk=4096)
    return {
        "path": path,
        "data": data,
        "models": models,
        "store": store,
        "thalamus": thalamus,
        "nifti": nifti,
    }


def test_cifti_round_trip_is_exact_and_keeps_the_brain_models(run: dict, cifti: dict) -> None:
    ds = bigglm.open_run(cifti["store"])
    assert ds.attrs["geometry"] == "grayordinate" and ds.attrs["tr"] == TR
    np.testing.assert_array_equal(ds["bold"].values, cifti["data"])
    out = bigglm.to_cifti(ds["bold"], ds, run["tmp"] / "bold.dscalar.nii")
    image = nib.load(out)
    assert image.header.get_axis(1) == cifti["models"]
    assert isinstance(image.header.get_axis(0), cifti2_axes.ScalarAxis)
    np.testing.assert_array_equal(np.asarray(image.dataobj), cifti["data"])


def test_a_cifti_result_writes_dscalar_maps(run: dict, cifti: dict) -> None:
    result = bigglm.fit(cifti["store"], design())
    files = result.to_nifti(run["tmp"] / "cmaps", "a", prefix="sub-01_space-fsLR_den-91k")
    assert [f.name for f in files][
        -1
    ] == "sub-01_space-fsLR_den-91k_contrast-a_stat-z_statmap.dscalar.nii"
    image = nib.load(files[-1])
    assert image.header.get_axis(1) == cifti["models"]
    np.testing.assert_array_equal(
        np.asarray(image.dataobj)[0], result.contrast("a")["z"].values.astype(np.float32)
    )


def test_a_cifti_series_is_read_in_bounded_blocks(
    run: dict, cifti: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigglm.io import cifti as cifti_io

    monkeypatch.setattr(cifti_io, "READ_BLOCK_BYTES", 5 * 4 * len(cifti["models"]))
    series = cifti_io.inspect_dtseries(cifti["path"])
    assert {len(block) for block in series.blocks()} <= {5, N_SCANS % 5 or 5}
    store = bigglm.convert(cifti["path"], run["tmp"] / "blocks.zarr", time_chunk=7)
    np.testing.assert_array_equal(bigglm.open_run(store)["bold"].values, cifti["data"])
    assert bigglm.open_run(store).attrs["sources"][0]["sha256"] == (
        hashlib.sha256(cifti["path"].read_bytes()).hexdigest()
    )


def test_a_cifti_fit_equals_the_fit_of_its_parts(run: dict, cifti: dict) -> None:
    whole = bigglm.fit(cifti["store"], design()).contrast("a - b")
    cortex = bigglm.fit(run["store"], design()).contrast("a - b")
    volume_store = bigglm.convert(
        cifti["nifti"], run["tmp"] / "thalamus.zarr", mask=cifti["thalamus"], tr=TR
    )
    volume = bigglm.fit(volume_store, design()).contrast("a - b")
    for name in ("effect", "stat", "z"):
        parts = np.concatenate([cortex[name].values, volume[name].values])
        np.testing.assert_allclose(whole[name].values, parts, rtol=1e-9)


# --- mesh graphs, clusters and TFCE ----------------------------------------------------


def plain_mesh_adjacency(run: dict) -> scipy.sparse.csr_array:
    """The store's columns' graph from the triangles, written plainly with scipy.sparse."""
    blocks = []
    for hemi, part in HEMIS.items():
        faces = np.asarray(run["mesh"].parts[part].faces)
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        n = 10242
        full = scipy.sparse.coo_array((np.ones(len(edges)), edges.T), shape=(n, n)).tocsr()
        full = ((full + full.T) > 0).astype(np.int8)
        keep = np.flatnonzero(run["keep"][hemi])
        blocks.append(full[keep][:, keep])
    return scipy.sparse.block_diag(blocks, format="csr")


@pytest.fixture(scope="module")
def graph(run: dict) -> spatial.Graph:
    return mesh_adjacency(run["store"], run["meshes"])


@pytest.fixture(scope="module")
def smooth_map(run: dict, graph: spatial.Graph) -> np.ndarray:
    """Noise smoothed over the graph (a few neighbour averages), so clusters are sizeable."""
    rng = np.random.default_rng(5)
    a = plain_mesh_adjacency(run).astype(np.float64)
    # identity() and diags() rather than eye_array/diags_array: those need scipy >= 1.12
    a = a + scipy.sparse.csr_array(scipy.sparse.identity(a.shape[0], format="csr"))
    a = scipy.sparse.csr_array(scipy.sparse.diags(1.0 / np.asarray(a.sum(axis=1)).ravel())) @ a
    x = rng.normal(size=graph.n)
    for _ in range(6):
        x = a @ x
    return x / x.std()


def test_mesh_adjacency_is_the_triangle_graph_of_the_kept_vertices(
    run: dict, graph: spatial.Graph
) -> None:
    reference = plain_mesh_adjacency(run)
    assert (as_sparse(graph) != reference).nnz == 0
    assert spatial.sparse_graph(reference).n_edges == graph.n_edges


def as_sparse(graph: spatial.Graph) -> scipy.sparse.csr_array:
    data = np.ones(graph.indices.size, np.int8)
    return scipy.sparse.csr_array((data, graph.indices, graph.indptr), shape=(graph.n,) * 2)


def test_cifti_adjacency_joins_mesh_vertices_and_grid_voxels(run: dict, cifti: dict) -> None:
    """CIFTI surfaces given by path; voxels joined when they share a face (plain loop)."""
    graph = mesh_adjacency(cifti["store"], run["meshes"])
    ijk = np.argwhere(cifti["thalamus"])
    faces = (np.abs(ijk[:, None, :] - ijk[None, :, :]).sum(axis=2) == 1).astype(np.int8)
    reference = scipy.sparse.block_diag([plain_mesh_adjacency(run), faces], format="csr")
    assert (as_sparse(graph) != reference).nnz == 0


def test_mesh_clusters_are_csgraph_components(
    run: dict, graph: spatial.Graph, smooth_map: np.ndarray
) -> None:
    threshold = 1.0
    labels, extents, _ = spatial.label(smooth_map, graph, threshold)
    above = np.flatnonzero(smooth_map > threshold)
    sub = plain_mesh_adjacency(run)[above][:, above]
    n, components = connected_components(sub, directed=False)
    assert n == len(extents) > 3
    # the same partition: each bigglm cluster is exactly one csgraph component
    pairs = set(zip(labels[above].tolist(), components.tolist(), strict=True))
    assert len(pairs) == n
    np.testing.assert_array_equal(np.sort(extents), np.sort(np.bincount(components)))
    table = surface_clusters_table(smooth_map, run["store"], graph, threshold)
    hemisphere_of = np.where(above < run["keep"]["L"].sum(), "L", "R")
    for hemi in HEMIS:
        mine = np.bincount(components[hemisphere_of == hemi])
        assert sorted(table.loc[table["Hemisphere"] == hemi, "Vertices"]) == sorted(mine[mine > 0])
    assert table["Vertices"].sum() == above.size
    np.testing.assert_allclose(table["Mass"].sum(), (smooth_map[above] - threshold).sum())


def plain_tfce(
    x: np.ndarray,
    adjacency: scipy.sparse.csr_array,
    E: float,
    H: float,
    n_steps: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Stepped TFCE written plainly: for each height h, the components of {x >= h}, each
    node scoring extent ** E * h ** H * dh (extent: node count, or sum of weights)."""
    heights = np.linspace(0.0, x.max(), n_steps + 1)[1:]
    dh = heights[0]
    out = np.zeros_like(x)
    for h in heights:
        nodes = np.flatnonzero(x >= h)
        _, labels = connected_components(adjacency[nodes][:, nodes], directed=False)
        w = None if weights is None else weights[nodes]
        out[nodes] += np.bincount(labels, weights=w)[labels] ** E * h**H * dh
    return out


def test_surface_tfce_equals_a_plain_reference(
    run: dict, graph: spatial.Graph, smooth_map: np.ndarray
) -> None:
    assert spatial.SURFACE_TFCE == {"E": 1.0, "H": 2.0}
    n_steps = 50
    ours = spatial.tfce(smooth_map, graph, **spatial.SURFACE_TFCE, n_steps=n_steps)
    reference = plain_tfce(smooth_map, plain_mesh_adjacency(run), 1.0, 2.0, n_steps)
    dh = smooth_map.max() / n_steps  # bigglm sums steps without dh, as fslmaths and nilearn
    np.testing.assert_allclose(ours * dh, reference, rtol=1e-9)


def test_area_weighted_surface_tfce_equals_a_plain_reference(
    run: dict, graph: spatial.Graph, smooth_map: np.ndarray
) -> None:
    areas = []
    for hemi, part in HEMIS.items():
        mesh = run["mesh"].parts[part]
        per_vertex = spatial.vertex_areas(mesh.coordinates, mesh.faces)
        xyz = np.asarray(mesh.coordinates, dtype=np.float64)
        a, b, c = (xyz[np.asarray(mesh.faces)[:, k]] for k in range(3))
        total = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()
        np.testing.assert_allclose(per_vertex.sum(), total, rtol=1e-12)  # a partition of it
        areas.append(per_vertex[run["keep"][hemi]])
    weights = np.concatenate(areas)
    ours = spatial.tfce(smooth_map, graph, E=1.0, H=2.0, n_steps=50, weights=weights)
    reference = plain_tfce(smooth_map, plain_mesh_adjacency(run), 1.0, 2.0, 50, weights)
    np.testing.assert_allclose(ours * smooth_map.max() / 50, reference, rtol=1e-9)


def test_permutation_tfce_on_the_mesh_uses_the_2d_defaults(
    run: dict, graph: spatial.Graph, smooth_map: np.ndarray
) -> None:
    ds = bigglm.open_run(run["store"])
    rng = np.random.default_rng(8)
    subjects = [f"sub-{i:02d}" for i in range(6)]
    effect = 0.5 * smooth_map + rng.normal(size=(6, graph.n))
    group = xr.Dataset(
        {"effect": (("subject", "voxel"), effect)},
        coords={"subject": subjects, **{k: ds[k] for k in ("hemisphere", "vertex")}},
        attrs={k: ds.attrs[k] for k in ("geometry", "hemispheres")},
    )
    out = bigglm.inference.permutation_test(
        group, pd.DataFrame({"mean": 1.0}, index=subjects), tfce=True, adjacency=graph, seed=0
    )
    assert (out.attrs["tfce_E"], out.attrs["tfce_H"]) == (1.0, 2.0)
    expected = spatial.tfce(out["t"].values, graph, E=1.0, H=2.0, n_steps=100)
    np.testing.assert_allclose(out["tfce"].values, expected, rtol=1e-12)
    assert out.sizes["rearrangement"] == 64  # every sign flip of 6 subjects
    written = bigglm.inference.write_maps(out, run["tmp"] / "group", contrast="mean")
    tfce_left = run["tmp"] / "group" / "group_hemi-L_contrast-mean_stat-tfce_statmap.shape.gii"
    assert tfce_left in written
    values = nib.load(tfce_left).darrays[0].data
    np.testing.assert_array_equal(
        values[run["keep"]["L"]], out["tfce"].values[: run["keep"]["L"].sum()].astype(np.float32)
    )


# --- bad input -------------------------------------------------------------------------


def test_hemispheres_of_different_runs_are_refused(run: dict) -> None:
    tmp = run["tmp"]
    short = write_series(tmp / "short_hemi-R_bold.func.gii", run["data"]["R"][:40], "R")
    with pytest.raises(StoreError, match=r"has 48 time points but .* has 40; the hemispheres"):
        bigglm.convert([run["files"]["L"], short], tmp / "bad.zarr", tr=TR)
    left = write_series(tmp / "ts_hemi-L_bold.func.gii", run["data"]["L"], "L", "2000")
    right = write_series(tmp / "ts_hemi-R_bold.func.gii", run["data"]["R"], "R", "1500")
    with pytest.raises(StoreError, match=r"TimeStep 2000\.0 but .* has 1500\.0; the hemispheres"):
        bigglm.convert([left, right], tmp / "bad.zarr", tr=TR)
    assert not (tmp / "bad.zarr").exists()


def test_a_gifti_without_time_points_is_refused(run: dict) -> None:
    with pytest.raises(StoreError, match="holds no time points"):
        bigglm.convert({"L": run["meshes"]["L"]}, run["tmp"] / "bad.zarr", tr=TR)
    with pytest.raises(StoreError, match="pass tr="):
        bigglm.convert(run["files"]["L"], run["tmp"] / "bad.zarr")


def test_a_cifti_that_is_not_a_dense_series_is_refused(run: dict, cifti: dict) -> None:
    scalar = bigglm.to_cifti(
        np.zeros(len(cifti["models"])), cifti["store"], run["tmp"] / "zeros.dscalar.nii"
    )
    with pytest.raises(StoreError, match=r"axes \['ScalarAxis', 'BrainModelAxis'\], not a dense"):
        bigglm.convert(scalar, run["tmp"] / "bad.zarr")


def test_non_finite_values_are_dropped_from_gifti_and_refused_in_cifti(
    run: dict, cifti: dict
) -> None:
    tmp = run["tmp"]
    data = run["data"]["L"][:, :40].copy()
    data[3, 7] = np.nan
    left = write_series(tmp / "nan_hemi-L_bold.func.gii", data, "L")
    with pytest.warns(BigGLMWarning, match="1 vertices have NaN or Inf"):
        store = bigglm.convert(left, tmp / "nan.zarr", tr=TR)
    expected = np.flatnonzero(run["keep"]["L"][:40] & (np.arange(40) != 7))
    np.testing.assert_array_equal(bigglm.open_run(store)["vertex"].values, expected)
    values = cifti["data"].copy()
    values[5, 2] = np.inf
    header = (cifti2_axes.SeriesAxis(0.0, TR, N_SCANS), cifti["models"])
    path = tmp / "inf.dtseries.nii"
    nib.save(nib.Cifti2Image(values, header=header), path)
    with pytest.raises(StoreError, match="1 grayordinates have NaN or Inf values"):
        bigglm.convert(path, tmp / "inf.zarr")
    assert not (tmp / "inf.zarr").exists()
    with pytest.raises(StoreError, match="brings its own grayordinates"):
        bigglm.convert(cifti["path"], tmp / "inf.zarr", mask=cifti["thalamus"])


def test_a_mesh_with_another_vertex_count_is_refused(run: dict) -> None:
    coords = np.asarray(run["mesh"].parts["left"].coordinates)[:642]
    faces = np.array([[0, 1, 2]])
    small = write_mesh(run["tmp"] / "small.surf.gii", coords, faces)
    with pytest.raises(StoreError, match="the mesh has 642 vertices but the maps' L has 10242"):
        mesh_adjacency(run["store"], {"L": small, "R": run["meshes"]["R"]})
    with pytest.raises(StoreError, match=r"has shape \(642,\) but .* has 10242 vertices"):
        bigglm.convert(
            run["files"]["L"], run["tmp"] / "bad.zarr", tr=TR, mask={"L": np.ones(642, bool)}
        )


def test_volume_writers_name_the_surface_writers(run: dict) -> None:
    ds = bigglm.open_run(run["store"])
    with pytest.raises(StoreError, match="write its maps with to_gifti or to_cifti"):
        bigglm.to_nifti(ds["bold"][0], ds, run["tmp"] / "x.nii.gz")
