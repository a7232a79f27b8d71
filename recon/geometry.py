"""Voxel grids in patient coordinates: where each pixel of a reconstructed volume lies.

Convention (the one the centered FFTs of :mod:`reconq.recon.fft` give): the centre of voxel
``(p, i, j)`` of a ``(nz, ny, nx)`` grid is

    centre + (j - nx // 2) * dx * read_dir + (i - ny // 2) * dy * phase_dir + (p - nz // 2) * dz * slice_dir

in mm, where ``centre`` is the acquisition's ``position`` (the slice or slab centre), x the readout
(columns), y the phase encode (rows) and z the partition or slice.

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421 (position and directions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid.

    Attributes:
        centre: ``(3,)`` float64, patient coordinate (mm) of voxel ``(nz // 2, ny // 2, nx // 2)``.
        dirs: ``(3, 3)`` float64, rows read_dir, phase_dir, slice_dir (unit vectors).
        spacing: ``(3,)`` float64, voxel size ``(dx, dy, dz)`` in mm.
        shape: ``(nz, ny, nx)``.
    """

    centre: np.ndarray
    dirs: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def make(cls, centre, dirs, spacing, shape) -> Grid:
        return cls(np.asarray(centre, dtype=np.float64), np.asarray(dirs, dtype=np.float64),
                   np.asarray(spacing, dtype=np.float64), tuple(int(n) for n in shape))  # type: ignore[arg-type]

    def offsets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel index offsets from the centre voxel along z, y, x: ``(nz,)``, ``(ny,)``, ``(nx,)``."""
        return tuple(np.arange(n) - n // 2 for n in self.shape)  # type: ignore[return-value]

    def points(self, x_index: np.ndarray | None = None) -> np.ndarray:
        """Patient coordinates (mm) of the voxel centres.

        Args:
            x_index: optional readout indices to keep (a batch of columns).

        Returns:
            ``(nz, ny, nx_or_len(x_index), 3)`` float64.
        """
        oz, oy, ox = self.offsets()
        if x_index is not None:
            ox = ox[np.asarray(x_index)]
        (dx, dy, dz), (read, phase, slc) = self.spacing, self.dirs
        return (self.centre
                + (oz * dz)[:, None, None, None] * slc
                + (oy * dy)[None, :, None, None] * phase
                + (ox * dx)[None, None, :, None] * read)

    def index_of(self, points: np.ndarray) -> np.ndarray:
        """Fractional voxel indices ``(..., 3)`` as ``(p, i, j)`` of patient coordinates ``(..., 3)``."""
        local = (np.asarray(points, dtype=np.float64) - self.centre) @ self.dirs.T  # (..., 3): x, y, z mm
        frac = local / self.spacing + np.array([n // 2 for n in self.shape[::-1]])
        return frac[..., ::-1]
