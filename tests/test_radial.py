"""Radial reconstruction of analytic phantoms: trajectories, DCFs, gridding, CG, coil maps, echoes.

The k-space comes from ``recon.phantoms`` (closed-form transforms, no NUFFT), the truth is the image a
fully sampled Cartesian scan of the same object gives. Radial spokes here oversample the readout by 2
(``dk = 0.5`` cycles per FOV, as scanners acquire radial data): at ``dk = 1`` the |k|-weighted
readout aliases the ramp filter's tails into the FOV (2D gridding NRMSE 0.27 against 0.04).
Bounds are the measured errors with a margin (the figures measured are in the comments); part of
every error is the k-space outside the ball that radial spokes do not reach (the truth's square
band: 0.022 NRMSE in 2D).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage

from reconq.recon import radial
from reconq.recon.errors import ReconError
from reconq.recon.nufft import NufftPlan
from reconq.recon.phantoms import CoilArray, Ellipsoid, Phantom
from reconq.recon.radial import RadialOptions

TE = (2.0, 12.0)  # ms


def nrmse(img, truth) -> float:
    return float(np.linalg.norm(np.asarray(img) - truth) / np.linalg.norm(truth))


def sos(x):
    return np.sqrt(np.sum(np.abs(x) ** 2, axis=0))


# ------------------------------------------------------------------------------------------ phantoms


@pytest.mark.parametrize("ndim,m,tol", [(2, 512, 1e-3), (3, 96, 3e-3)])
def test_phantom_kspace_is_the_fourier_transform_of_its_image(ndim, m, tol):
    comp = Ellipsoid((0.05, -0.1, 0.03)[:ndim], (0.2, 0.3, 0.15)[:ndim], 1.0, angle_deg=25)
    ph = Phantom((comp,), CoilArray.default(ndim, 2, seed=1))
    pts = ph.pixel_points((m,) * ndim)
    obj = ph.image(pts) * ph.sensitivity(pts)  # (ncoil, ...)
    k = np.array([[0.0] * ndim, [1.3, -2.2, 0.7][:ndim], [5.1, 3.3, -4.2][:ndim]])
    riemann = np.array([[np.sum(o * np.exp(-2j * np.pi * (pts @ kk))) / m**ndim for kk in k] for o in obj])
    got = ph.kspace(k)
    assert got.shape == (2, 3)
    assert np.abs(got - riemann).max() / np.abs(got).max() < tol
    np.testing.assert_allclose(Phantom((comp,)).kspace(k)[0], comp.transform(k), rtol=1e-5, atol=1e-7)


def test_phantom_echoes_decay_with_each_components_t2star():
    fast, slow = Ellipsoid((0.0, 0.1), (0.1, 0.1), 1.0, 10.0), Ellipsoid((0.0, -0.2), (0.1, 0.1), 2.0, 40.0)
    k = radial.radial_2d(4, 16, 8.0).reshape(-1, 2)
    both = Phantom((fast, slow)).kspace(k, TE)
    assert both.shape == (2, 1, 64)
    want = [math.exp(-t / 10) * Phantom((fast,)).kspace(k)[0] + math.exp(-t / 40) * Phantom((slow,)).kspace(k)[0]
            for t in TE]
    np.testing.assert_allclose(both[:, 0], np.array(want), rtol=1e-5, atol=1e-6)


def test_cartesian_gridding_with_unit_weights_is_the_truth():
    """The scale convention: a full Cartesian grid, DCF 1, comes back as the phantom's truth."""
    shape = (32, 40)
    ph = Phantom.default(2, ncoil=3, scale=np.prod(shape))
    ky, kx = np.meshgrid(np.arange(32) - 16, np.arange(40) - 20, indexing="ij")
    coord = np.stack([ky, kx], -1).astype(np.float32)  # (32 readouts, 40 samples, 2)
    plan = NufftPlan(coord.reshape(-1, 2), shape, n_trans=3, eps=1e-6)
    img = radial.gridding(plan, ph.kspace(coord).reshape(3, -1), np.ones(coord.shape[:2], np.float32))
    assert nrmse(img, ph.truth_coils(shape)) < 1e-4


# ------------------------------------------------------------------------------------- trajectories, DCF


def test_trajectory_shapes_and_centres():
    full, half = radial.radial_2d(10, 64, 32.0), radial.radial_2d(10, 32, 32.0, half=True, golden=True)
    assert full.shape == (10, 64, 2) and full.dtype == np.float32 and half.shape == (10, 32, 2)
    assert np.all(full[:, 32] == 0) and np.all(half[:, 0] == 0)
    assert np.isclose(np.abs(full).max(), 32) and np.linalg.norm(half, axis=-1).max() < 32
    koosh = radial.kooshball(100, 64, 32.0)
    assert koosh.shape == (100, 64, 3) and np.all(koosh[:, 32] == 0) and np.all(koosh[:, -1, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(koosh[:, 0], axis=-1), 32, rtol=1e-5)
    ball = radial.kooshball(500, 32, 32.0, half=True)
    assert abs(ball[:, -1, 0].mean()) < 1.0  # both hemispheres
    stars = radial.stack_of_stars(6, 64, 32.0, nz=8)
    assert stars.shape == (48, 64, 3)
    assert sorted(set(stars[:, 0, 0])) == list(range(-4, 4))
    np.testing.assert_array_equal(stars[:6, :, 1:], stars[6:12, :, 1:])


def test_analytic_dcf_centre_and_rings():
    nsp, dk = 50, 0.5
    full = radial.analytic_dcf(radial.radial_2d(nsp, 128, 32.0), "2d")
    half = radial.analytic_dcf(radial.radial_2d(2 * nsp, 64, 32.0, half=True), "2d")
    assert full.shape == (nsp, 128) and full.dtype == np.float32
    assert np.isclose(full[0, 64], np.pi * dk**2 / 4 / nsp)  # the centre disc, shared by all spokes
    assert np.isclose(full[0, 66], 2 * np.pi * 1.0 * dk / (2 * nsp))  # ring at |k| = 1, 2 half-lines a spoke
    np.testing.assert_allclose(half[0, 1:], full[0, 65:], rtol=1e-5)  # same half-lines, same weights
    assert np.isclose(half[:, 0].sum(), np.pi * dk**2 / 4)
    assert abs(full.sum() / (np.pi * 32**2) - 1) < 0.02
    koosh = radial.analytic_dcf(radial.kooshball(400, 64, 16.0), "3d")
    assert np.isclose(koosh[:, 32].sum(), np.pi * dk**3 / 6)
    assert abs(koosh.sum() / (4 / 3 * np.pi * 16**3) - 1) < 0.03
    stars = radial.analytic_dcf(radial.stack_of_stars(nsp, 128, 32.0, nz=4), "stack")
    np.testing.assert_allclose(stars[:nsp], full, rtol=1e-6)
    with pytest.raises(ReconError, match="unknown DCF kind"):
        radial.analytic_dcf(radial.radial_2d(4, 16, 8.0), "spiral")
    with pytest.raises(ReconError, match="nreadouts, ns"):
        radial.analytic_dcf(radial.radial_2d(4, 16, 8.0), "3d")


# ---------------------------------------------------------------------------------------------- 2D


@pytest.fixture(scope="module")
def phantom_2d():
    shape = (128, 128)
    ph = Phantom.default(2, ncoil=8, seed=3, scale=np.prod(shape))
    return ph, shape, ph.truth(shape)


@pytest.mark.parametrize("half", [False, True])
def test_2d_radial_gridding_and_cg(phantom_2d, half):
    ph, shape, truth = phantom_2d
    nsp = math.ceil(math.pi / 2 * 128) * (2 if half else 1)  # angular Nyquist
    coord = radial.radial_2d(nsp, 128 if half else 256, 64.0, half=half, golden=half)
    ksp = ph.kspace(coord)[None]
    grid = radial.reconstruct(coord, ksp, shape, "2d", RadialOptions())[0]
    iterative = radial.reconstruct(coord, ksp, shape, "2d", RadialOptions(niter=10))[0]
    e_grid, e_cg = nrmse(grid, truth), nrmse(iterative, truth)
    assert e_grid < 0.08  # measured 0.038 (full), 0.049 (half, golden)
    assert e_cg < 0.04  # measured 0.022, 0.023
    assert e_cg < 0.7 * e_grid


def test_pipe_menon_dcf_matches_the_analytic_one_inside(phantom_2d):
    ph, shape, truth = phantom_2d
    coord = radial.radial_2d(202, 256, 64.0)
    analytic, pipe = radial.analytic_dcf(coord, "2d"), radial.pipe_menon_dcf(coord, shape)
    assert pipe.shape == analytic.shape and pipe.dtype == np.float32
    ratio = (pipe / analytic)[:, 32:96]  # |k| from 8 to 48 of 64 (not the centre, not the edge)
    assert abs(np.median(ratio) - 1) < 0.02 and np.percentile(np.abs(ratio - 1), 90) < 0.1
    img = radial.reconstruct(coord, ph.kspace(coord)[None], shape, "2d", RadialOptions(dcf="pipe"))[0]
    assert nrmse(img, truth) < 0.05  # measured 0.028


def test_coil_maps_combine(phantom_2d):
    ph, shape, truth = phantom_2d
    coord = radial.radial_2d(202, 256, 64.0)
    ksp = ph.kspace(coord)[None]
    maps = radial.lowres_maps(coord, ksp, shape, nvol=1, ncoil=8, radius=12)
    assert maps.shape == (8, *shape) and maps.dtype == np.complex64
    head = ph.image(ph.pixel_points(shape)) > 0
    np.testing.assert_allclose(sos(maps)[head], 1, rtol=1e-3)
    grid = radial.reconstruct(coord, ksp, shape, "2d", RadialOptions(combine="maps"))[0]
    sense = radial.reconstruct(coord, ksp, shape, "2d", RadialOptions(combine="maps", niter=10, lamda=1e-4))[0]
    assert nrmse(grid, truth) < 0.07  # measured 0.038
    assert nrmse(sense, truth) < 0.04  # measured 0.022
    assert nrmse(sense, truth) < nrmse(grid, truth)


def test_toeplitz_cg_equals_nufft_cg(phantom_2d):
    ph, shape, _ = phantom_2d
    coord = radial.radial_2d(101, 256, 64.0, golden=True)
    flat = coord.reshape(-1, 2)
    ksp = ph.kspace(coord).reshape(8, -1)
    dcf = radial.analytic_dcf(coord, "2d").reshape(-1)
    plan = NufftPlan(flat, shape, n_trans=8, eps=1e-6)
    plain = radial.cg(plan, ksp, dcf, 5)
    fast = radial.cg(plan, ksp, dcf, 5, toeplitz=radial.ToeplitzKernel(flat, shape, dcf, eps=1e-6))
    assert plain.shape == (8, *shape)
    assert nrmse(fast, plain) < 1e-3


def test_samples_outside_the_grid_are_dropped(phantom_2d, caplog):
    ph, _, _ = phantom_2d
    small = (64, 64)
    coord = radial.radial_2d(202, 256, 64.0)  # encoded for 128 x 128
    ksp = ph.kspace(coord)[None]
    with caplog.at_level(logging.DEBUG, logger="reconq.recon.radial"):
        img = radial.reconstruct(coord, ksp, small, "2d", RadialOptions(niter=5))[0]
    assert any("outside the (64, 64) grid" in r.getMessage() for r in caplog.records)
    truth = ph.truth(small)  # the same k-space: the image scale is that of the 128 x 128 encoding
    assert img.shape == small and nrmse(img, truth) < 0.02  # measured 0.0056


@pytest.mark.parametrize("options,match", [
    (RadialOptions(dcf="voronoi"), "dcf must be"),
    (RadialOptions(combine="espirit"), "combine must be"),
    (RadialOptions(niter=-1), "niter"),
    (RadialOptions(niter=2.5), "niter"),
    (RadialOptions(lamda=-1.0), "lamda"),
    (RadialOptions(eps=0.0), "eps"),
    (RadialOptions(eps=0.5), "eps"),
    (RadialOptions(lowres=0.0), "lowres"),
])
def test_bad_options_are_refused(options, match):
    coord = radial.radial_2d(8, 32, 16.0)
    with pytest.raises(ReconError, match=match):
        radial.reconstruct(coord, np.zeros((1, 2, 8, 32), np.complex64), (32, 32), "2d", options)


def test_bad_kind_and_shapes_are_refused():
    coord = radial.radial_2d(8, 32, 16.0)
    ksp = np.zeros((1, 2, 8, 32), np.complex64)
    with pytest.raises(ReconError, match="unknown radial kind"):
        radial.reconstruct(coord, ksp, (32, 32), "spiral")
    with pytest.raises(ReconError, match="ksp must be"):
        radial.reconstruct(coord, ksp[..., :16], (32, 32), "2d")
    with pytest.raises(ReconError, match="coord must be"):
        radial.reconstruct(coord, ksp, (32, 32, 32), "3d")
    with pytest.raises(ReconError, match="no sample"):
        radial.reconstruct(coord + 40, ksp, (32, 32), "2d")


# ---------------------------------------------------------------------------------------------- 3D


@pytest.fixture(scope="module")
def kooshball_64():
    """64^3, 8 coils, 2 echoes, angular Nyquist (6434 full spokes), 128 samples a spoke."""
    shape = (64, 64, 64)
    ph = Phantom.default(3, ncoil=8, seed=0, scale=np.prod(shape))
    coord = radial.kooshball(math.ceil(math.pi / 2 * 64**2), 128, 32.0)
    ksp = ph.kspace(coord, TE)  # (2, 8, nspokes, 128)
    truth = np.stack([ph.truth(shape, te) for te in TE])
    grid = radial.reconstruct(coord, ksp, shape, "3d", RadialOptions())
    iterative = radial.reconstruct(coord, ksp, shape, "3d", RadialOptions(niter=10))
    return ph, shape, truth, grid, iterative


def test_kooshball_gridding_and_cg(kooshball_64):
    _, shape, truth, grid, iterative = kooshball_64
    assert grid.shape == iterative.shape == (2, *shape) and grid.dtype == np.float32
    for echo in range(2):
        e_grid, e_cg = nrmse(grid[echo], truth[echo]), nrmse(iterative[echo], truth[echo])
        assert e_grid < 0.13  # measured 0.090, 0.081
        assert e_cg < 0.06  # measured 0.041, 0.036
        assert e_cg < 0.6 * e_grid


def test_kooshball_echo_ratio_follows_t2star(kooshball_64):
    ph, shape, _, _, iterative = kooshball_64
    pts = ph.pixel_points(shape)
    inside = np.stack([c.inside(pts) for c in ph.components])
    brain_only = inside[2] & ~inside[3:].any(axis=0)
    ventricle = inside[4] & inside[2] & ~np.delete(inside[3:], 1, axis=0).any(axis=0)
    expected_ratio = ph.image(pts, TE[1]) / np.maximum(ph.image(pts, TE[0]), 1e-30)
    measured = iterative[1] / np.maximum(iterative[0], 1e-30)
    checked = []
    for region, erode in ((brain_only, 3), (ventricle, 1)):
        mask = ndimage.binary_erosion(region, iterations=erode)
        assert mask.sum() > 20
        want = float(np.median(expected_ratio[mask]))
        got = float(np.median(measured[mask]))
        assert abs(got - want) < 0.015, (got, want)
        checked.append(want)
    assert np.isclose(checked[0], math.exp(-(TE[1] - TE[0]) / 50.0))  # brain: T2* 50 ms
    assert checked[1] < checked[0] - 0.05  # the ventricles add T2* 20 ms signal: faster decay


def test_stack_of_stars():
    shape = (16, 96, 96)
    ph = Phantom.default(3, ncoil=4, seed=2, scale=np.prod(shape))
    coord = radial.stack_of_stars(math.ceil(math.pi / 2 * 96), 192, 48.0, nz=16)
    ksp = ph.kspace(coord)[None]
    truth = ph.truth(shape)
    grid = radial.reconstruct(coord, ksp, shape, "stack", RadialOptions())[0]
    iterative = radial.reconstruct(coord, ksp, shape, "stack", RadialOptions(niter=8))[0]
    assert nrmse(grid, truth) < 0.07  # measured 0.036
    assert nrmse(iterative, truth) < 0.035  # measured 0.019
    assert nrmse(iterative, truth) < nrmse(grid, truth)


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cupy_path_matches_numpy(cuda, phantom_2d):
    import cupy

    ph, shape, _ = phantom_2d
    coord = radial.radial_2d(202, 256, 64.0)
    ksp = ph.kspace(coord, TE)
    for options in (RadialOptions(niter=5), RadialOptions(combine="maps", niter=5), RadialOptions(dcf="pipe")):
        host = radial.reconstruct(coord, ksp, shape, "2d", options)
        device = radial.reconstruct(cupy.asarray(coord), cupy.asarray(ksp), shape, "2d", options)
        assert isinstance(device, cupy.ndarray) and device.shape == host.shape
        assert nrmse(cupy.asnumpy(device), host) < 1e-3
