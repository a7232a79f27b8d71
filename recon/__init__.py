"""ReconQ reconstruction library: raw MRD reading, Cartesian and SENSE recon, scanner-ready images.

A pure library: numpy/cupy arrays (the caller picks the device), sigpy, scipy, h5py and ismrmrd.

Modules, lowest layer first (array functions, operators, solvers, one run per recon):
    errors         the exception family (ReconError, UnknownPipelineError)
    fft            centered unitary FFTs (threaded on the host)
    geometry       voxel grids in patient coordinates
    noise          noise covariance and pre-whitening
    partialfourier POCS for partial Fourier and asymmetric echoes
    coils          coil combination (sum of squares, with maps)
    coilmaps       ESPIRiT and Walsh maps, resampling between grids (reference scans)
    sense          the SENSE operator, CG and direct unfolding, the readout-column driver
    rawdata        RawScan, a read-only view of a raw MRD HDF5 file
    cartesian      k-space buffering and the Cartesian reconstruction
    senserecon     the SENSE reconstruction of one volume, reference-scan maps
    images         magnitude images in the scanner's conventions (uint16, geometry, meta)
    simulate       synthetic multi-coil scans in patient coordinates for tests and benchmarks
    pipelines      the registry of named pipelines (``cartesian``, ``sense``)
"""

from reconq.recon.errors import ReconError, UnknownPipelineError

__all__ = ["ReconError", "UnknownPipelineError"]
