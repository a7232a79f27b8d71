"""ReconQ reconstruction library: raw MRD reading, Cartesian recon, scanner-ready images.

A pure library: numpy/cupy arrays (the caller picks the device), h5py and ismrmrd only.

Modules, lowest layer first:
    errors     the exception family (ReconError, UnknownPipelineError)
    fft        centered orthonormal FFTs
    coils      coil combination (sum of squares)
    rawdata    RawScan, a read-only view of a raw MRD HDF5 file
    cartesian  k-space buffering and the Cartesian reconstruction
    images     magnitude images in the scanner's conventions (uint16, geometry, meta)
    simulate   synthetic multi-coil scans for demos, tests and benchmarks
    pipelines  the registry of named pipelines (``cartesian``)
"""

from recon.errors import ReconError, UnknownPipelineError

__all__ = ["ReconError", "UnknownPipelineError"]
