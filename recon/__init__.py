"""ReconQ reconstruction library: the pipeline contract; Cartesian, SENSE, radial and motion-corrected SENSE
recon; scanner-ready images.

A pure library: numpy/cupy arrays (the caller picks the device), sigpy, scipy, h5py and ismrmrd. Raw
files are read through the foundation's one MRD reader, :mod:`reconq.core.mrdfile`.

Modules, lowest layer first (array functions, operators, solvers, one run per recon):
    errors         the exception family (ReconError, UnknownPipelineError)
    fft            centered unitary FFTs (threaded on the host)
    geometry       voxel grids in patient coordinates
    noise          noise covariance and pre-whitening
    partialfourier POCS for partial Fourier and asymmetric echoes
    coils          coil combination (sum of squares, with maps)
    coilmaps       ESPIRiT and Walsh maps, resampling between grids (reference scans)
    sense          the SENSE operator, CG and direct unfolding, the readout-column driver
    images         magnitude images in the scanner's conventions (uint16, geometry, meta)
    rawdata        RawScan, a read-only view of a raw MRD file: header, readout headers, chunks of
                   readouts with their samples and trajectories
    kspace         Cartesian k-space buffering (KspaceBuffer, one k-space per VolumeKey), the
                   encoding, partial Fourier extents and image geometry of a buffered volume
    nufft          the NUFFT adapter (finufft, cufinufft on cupy): one plan per trajectory
    phantoms       ellipse and ellipsoid phantoms with analytic k-space (coils, echo decay) and their truth
    radial         radial recon on arrays: trajectories, density compensation, gridding, CG, coil maps
    radialdata     radial raw data: encoding, trajectory units, readouts into volumes, image geometry
    pulseq         trajectories of Pulseq scans from their .seq files, matched by signature
    cartesian      the Cartesian reconstruction of one volume (POCS, FFT, recon space, coil combination)
    senserecon     the SENSE reconstruction of one volume, reference-scan maps
    motion         rigid transforms as unitary sinc operators (Fourier shifts and shears), derivatives
    alignsense     motion-corrected SENSE (aligned SENSE, DISORDER) on arrays
    simulate       synthetic multi-coil scans in patient coordinates for tests and benchmarks
    radialsim      synthetic radial scans (acq.traj in either unit, or none for Pulseq scans)
    shotsim        synthetic multi-shot Cartesian scans of a phantom moving between shots
    estimates      the solvers' resource models (plain arithmetic, for the pipelines' estimates)
    pipeline       the pipeline contract: name, run, memory and run-time estimates, cpu_capable
    pipelines      the built-in pipelines (``cartesian``, ``sense``, ``radial``, ``alignsense``)
    registry       the registry of named pipelines (register, get_pipeline, pipeline_names)
    plugins        offline twix-style recon functions as pipelines (plugin files, entry points)
"""

from reconq.recon.errors import ReconError, UnknownPipelineError

__all__ = ["ReconError", "UnknownPipelineError"]
