"""The NUFFT adapter against the exact non-uniform DFT it approximates, and its adjointness."""

from __future__ import annotations

import numpy as np
import pytest

from reconq.recon.errors import ReconError
from reconq.recon.nufft import NufftPlan

SHAPES = [(24, 20), (10, 12, 9)]  # even and odd sizes, 2D and 3D


def random_coord(rng: np.random.Generator, shape: tuple[int, ...], npts: int) -> np.ndarray:
    """Uniform random points over the whole grid, -N/2..N/2 per axis (the edges included)."""
    half = np.array(shape) / 2
    coord = rng.uniform(-half, half, (npts, len(shape)))
    coord[0], coord[1] = -half, half
    return coord.astype(np.float32)


def random_img(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def ndft_matrix(coord: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """E[j, x] = exp(-2 pi i k_j . (x - N//2) / N), x over every voxel in C order (float64)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    phase = (coord.astype(np.float64) / np.array(shape)) @ grid.T
    return np.exp(-2j * np.pi * phase)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_the_exact_ndft(shape):
    rng = np.random.default_rng(1)
    coord = random_coord(rng, shape, 400)
    img = np.stack([random_img(rng, shape) for _ in range(2)])
    ksp = NufftPlan(coord, shape, n_trans=2).forward(img)
    assert ksp.shape == (2, 400) and ksp.dtype == np.complex64
    subset = rng.choice(400, 60, replace=False)
    want = img.reshape(2, -1).astype(np.complex128) @ ndft_matrix(coord[subset], shape).T
    assert relative_error(ksp[:, subset], want) < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_adjoint_matches_the_exact_ndft(shape):
    rng = np.random.default_rng(2)
    coord = random_coord(rng, shape, 300)
    ksp = (rng.standard_normal((2, 300)) + 1j * rng.standard_normal((2, 300))).astype(np.complex64)
    img = NufftPlan(coord, shape, n_trans=2).adjoint(ksp)
    assert img.shape == (2, *shape) and img.dtype == np.complex64
    voxels = rng.choice(int(np.prod(shape)), 60, replace=False)
    want = ksp.astype(np.complex128) @ ndft_matrix(coord, shape)[:, voxels].conj()
    assert relative_error(img.reshape(2, -1)[:, voxels], want) < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_adjoint_is_the_adjoint_of_forward(shape):
    rng = np.random.default_rng(3)
    n_trans, npts = 3, 500
    plan = NufftPlan(random_coord(rng, shape, npts), shape, n_trans=n_trans)
    x = np.stack([random_img(rng, shape) for _ in range(n_trans)])
    y = (rng.standard_normal((n_trans, npts)) + 1j * rng.standard_normal((n_trans, npts))).astype(np.complex64)
    lhs = np.vdot(plan.forward(x), y)
    rhs = np.vdot(x, plan.adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_a_stack_transforms_as_each_image_alone(shape):
    rng = np.random.default_rng(4)
    coord = random_coord(rng, shape, 200)
    imgs = np.stack([random_img(rng, shape) for _ in range(4)])
    ksp = (rng.standard_normal((4, 200)) + 1j * rng.standard_normal((4, 200))).astype(np.complex64)
    stack, single = NufftPlan(coord, shape, n_trans=4), NufftPlan(coord, shape, n_trans=1)
    forward, adjoint = stack.forward(imgs), stack.adjoint(ksp)
    for i in range(4):
        np.testing.assert_allclose(forward[i], single.forward(imgs[i:i + 1])[0], rtol=0, atol=1e-5 * abs(forward).max())
        np.testing.assert_allclose(adjoint[i], single.adjoint(ksp[i:i + 1])[0], rtol=0, atol=1e-5 * abs(adjoint).max())


@pytest.mark.parametrize("axis, value", [(0, 12.5), (1, -10.01)])
def test_coordinates_outside_the_grid_are_refused(axis, value):
    shape = (24, 20)
    coord = random_coord(np.random.default_rng(5), shape, 50)
    coord[7, axis] = value
    with pytest.raises(ReconError, match=rf"axis {axis} holds {value:g}, outside the grid's"):
        NufftPlan(coord, shape)


def test_wrong_shapes_are_refused():
    coord = random_coord(np.random.default_rng(6), (16, 16), 30)
    with pytest.raises(ReconError, match="coord must be"):
        NufftPlan(coord, (16, 16, 16))
    plan = NufftPlan(coord, (16, 16), n_trans=2)
    with pytest.raises(ReconError, match="forward expects"):
        plan.forward(np.zeros((1, 16, 16), np.complex64))
    with pytest.raises(ReconError, match="adjoint expects"):
        plan.adjoint(np.zeros((2, 31), np.complex64))


@pytest.mark.gpu
def test_gpu_matches_cpu(cuda):
    import cupy

    pytest.importorskip("cufinufft", reason="cufinufft is not installed: GPU test not run")
    rng = np.random.default_rng(7)
    shape = (10, 12, 9)
    coord = random_coord(rng, shape, 300)
    img = np.stack([random_img(rng, shape) for _ in range(2)])
    ksp = (rng.standard_normal((2, 300)) + 1j * rng.standard_normal((2, 300))).astype(np.complex64)
    cpu, gpu = NufftPlan(coord, shape, n_trans=2), NufftPlan(cupy.asarray(coord), shape, n_trans=2)
    assert relative_error(cupy.asnumpy(gpu.forward(cupy.asarray(img))), cpu.forward(img)) < 1e-4
    assert relative_error(cupy.asnumpy(gpu.adjoint(cupy.asarray(ksp))), cpu.adjoint(ksp)) < 1e-4
