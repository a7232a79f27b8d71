"""The start-up self-test of a worker's numerical stack: ``python -m reconq.workers.selftest [--gpu]``.

Each check runs a small computation and compares it with a reference; it prints ``ok <check>: ...`` and
the next one runs. The first that fails prints ``reconq selftest: FAILED <check>: <why>; <what to do>``
and the test exits 1, so a container whose CUDA setup is broken stops loudly at its start instead of a
worker quietly running its recons on the host (``reconq.recon.nufft`` falls back to finufft where
cufinufft cannot be imported).

Without ``--gpu``: numpy's FFT against a direct DFT, finufft type 1 and 2 against direct sums, an MRD
file written and read back (h5py, ismrmrd) in a temporary folder. With ``--gpu``, first: NVML's devices
and memory, cupy's CUDA runtime and devices, an elementwise kernel (NVRTC) and a cuFFT FFT on every
device against numpy, and cufinufft type 1 and 2 against finufft (where cufinufft is installed).

It imports only numpy, finufft, h5py, ismrmrd and, with ``--gpu``, pynvml, cupy and cufinufft: no Redis,
Celery or ReconQ module, so it runs before anything else is reachable (compose runs it before the GPU
worker starts).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GiB = 2**30


class CheckFailed(Exception):
    """A check's result: why it failed, and what to do about it."""

    def __init__(self, why: str, todo: str) -> None:
        super().__init__(f"{why}; {todo}")


def _close(what: str, got: Any, want: Any, rtol: float) -> float:
    """The relative error of ``got`` against ``want`` (max-norm); raises CheckFailed above ``rtol``."""
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    if not np.isfinite(err) or err > rtol:
        raise CheckFailed(f"{what}: relative error {err:.2e} above {rtol:.0e}",
                          "the library computes wrong results: reinstall it from the lock, or report the versions")
    return err


def _points(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(-np.pi, np.pi, m), rng.uniform(-np.pi, np.pi, m)


def _direct_type1(x: np.ndarray, y: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
    """f[k1, k2] = sum_j c_j exp(+i (k1 x_j + k2 y_j)), k = -n/2 .. n/2-1 (finufft's default mode order)."""
    k = np.arange(-(n // 2), (n + 1) // 2)
    return np.einsum("aj,bj,j->ab", np.exp(1j * np.outer(k, x)), np.exp(1j * np.outer(k, y)), c)


def _direct_type2(x: np.ndarray, y: np.ndarray, f: np.ndarray) -> np.ndarray:
    """c_j = sum_k f[k1, k2] exp(-i (k1 x_j + k2 y_j))."""
    n = f.shape[0]
    k = np.arange(-(n // 2), (n + 1) // 2)
    return np.einsum("ja,jb,ab->j", np.exp(-1j * np.outer(x, k)), np.exp(-1j * np.outer(y, k)), f)


# --- the CPU stack --------------------------------------------------------------------------------------

def check_numpy() -> str:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 16)) + 1j * rng.standard_normal((8, 16))
    dft = np.exp(-2j * np.pi * np.outer(np.arange(16), np.arange(16)) / 16)
    err = _close("FFT", np.fft.fft(a, axis=1), a @ dft.T, 1e-10)
    return f"numpy {np.__version__}: FFT against a direct DFT, relative error {err:.1e}"


def check_finufft() -> str:
    try:
        import finufft
    except ImportError as e:
        raise CheckFailed(f"finufft cannot be imported ({e})", "install the image's lock (finufft) again") from e
    rng = np.random.default_rng(2)
    n, m = 16, 200
    x, y = _points(rng, m)
    c = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    f = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    err1 = _close("type 1", finufft.nufft2d1(x, y, c, (n, n), eps=1e-9, isign=+1), _direct_type1(x, y, c, n),
                  1e-7)
    err2 = _close("type 2", finufft.nufft2d2(x, y, f, eps=1e-9, isign=-1), _direct_type2(x, y, f), 1e-7)
    return f"finufft {finufft.__version__}: type 1 and 2 against direct sums, relative errors {err1:.1e}, {err2:.1e}"


def check_mrd_file() -> str:
    try:
        import h5py
        import ismrmrd
    except ImportError as e:
        raise CheckFailed(f"h5py or ismrmrd cannot be imported ({e})", "install the image's lock again") from e
    rng = np.random.default_rng(3)
    samples = (rng.standard_normal((4, 32)) + 1j * rng.standard_normal((4, 32))).astype(np.complex64)
    header = "<ismrmrdHeader><version>2</version></ismrmrdHeader>"
    with tempfile.TemporaryDirectory(prefix="reconq-selftest-") as tmp:
        path = Path(tmp) / "selftest.h5"
        try:
            dset = ismrmrd.Dataset(str(path), "/dataset", create_if_needed=True)
            dset.write_xml_header(header)
            acq = ismrmrd.Acquisition.from_array(samples)
            acq.scan_counter = 7
            dset.append_acquisition(acq)
            dset.close()
            dset = ismrmrd.Dataset(str(path), "/dataset", create_if_needed=False)
            xml = dset.read_xml_header()
            back = dset.read_acquisition(0)
            dset.close()
            with h5py.File(path, "r") as f:
                rows = f["dataset/data"].shape[0]
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckFailed(f"an MRD file could not be written and read back in {tmp} ({e})",
                              "check that the temporary folder (TMPDIR, /tmp) is writable and HDF5 works") from e
    xml = xml.decode() if isinstance(xml, bytes) else xml
    if xml != header or rows != 1 or back.scan_counter != 7 or not np.array_equal(back.data, samples):
        raise CheckFailed("an MRD file read back differs from what was written",
                          "h5py or ismrmrd is broken: install the image's lock again")
    return f"mrd file: h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), ismrmrd written and read back"


# --- the GPU stack --------------------------------------------------------------------------------------

_GPU_SETUP = ("run the container with the GPU reserved (compose: deploy.resources.reservations.devices; "
              "docker run --gpus) and the NVIDIA Container Toolkit on the host, and check nvidia-smi there")


def check_nvml() -> str:
    try:
        import pynvml
    except ImportError as e:
        raise CheckFailed(f"pynvml cannot be imported ({e})", "use the GPU image (--build-arg VARIANT=gpu)") from e
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        devices = []
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(f"{i}: {name}, {mem.total / GiB:.0f} GiB ({mem.used / GiB:.1f} used)")
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except pynvml.NVMLError as e:
        raise CheckFailed(f"NVML cannot read the GPUs ({e})",
                          f"{_GPU_SETUP}; NVIDIA_DRIVER_CAPABILITIES must include utility") from e
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    if not devices:
        raise CheckFailed("NVML sees no GPU", _GPU_SETUP)
    return f"nvml: driver {driver}, {count} device(s): " + "; ".join(devices)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise CheckFailed(f"cupy cannot be imported ({e})",
                          "use the GPU image (--build-arg VARIANT=gpu), or install ReconQ's [gpu] extra") from e
    return cupy


def check_cupy() -> str:
    cupy = _cupy()
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
        rt, drv = runtime.runtimeGetVersion(), runtime.driverGetVersion()
        props = runtime.getDeviceProperties(0)
    except Exception as e:  # CUDARuntimeError, or a CUDA library that cannot be loaded
        raise CheckFailed(f"CUDA is unusable ({type(e).__name__}: {e})",
                          f"{_GPU_SETUP}; the driver must support CUDA 12 (driver 525 or newer)") from e
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return (f"cupy {cupy.__version__}: CUDA runtime {rt // 1000}.{rt % 1000 // 10}, driver's CUDA {drv // 1000}."
            f"{drv % 1000 // 10}, {count} device(s), device 0: {name}, {props['totalGlobalMem'] / GiB:.0f} GiB")


def check_cupy_kernels() -> str:
    cupy = _cupy()
    rng = np.random.default_rng(4)
    x = rng.standard_normal(4096).astype(np.float32)
    vol = (rng.standard_normal((16, 16, 16)) + 1j * rng.standard_normal((16, 16, 16))).astype(np.complex64)
    want_fft = np.fft.fftn(vol)
    names = []
    for device in range(cupy.cuda.runtime.getDeviceCount()):
        with cupy.cuda.Device(device):
            try:
                axpb = cupy.ElementwiseKernel("float32 x, float32 a, float32 b", "float32 y", "y = a * x + b",
                                              "reconq_selftest_axpb")
                got = cupy.asnumpy(axpb(cupy.asarray(x), np.float32(2.0), np.float32(1.0)))
            except Exception as e:
                raise CheckFailed(f"device {device}: an elementwise kernel did not compile or run "
                                  f"({type(e).__name__}: {e})",
                                  "NVRTC (nvidia-cuda-nvrtc-cu12) or the driver is missing or too old; "
                                  "CUPY_CACHE_DIR must be writable") from e
            _close(f"device {device}: elementwise kernel", got, 2 * x + 1, 1e-6)
            try:
                got_fft = cupy.asnumpy(cupy.fft.fftn(cupy.asarray(vol)))
            except Exception as e:
                raise CheckFailed(f"device {device}: cuFFT failed ({type(e).__name__}: {e})",
                                  "the cuFFT library (nvidia-cufft-cu12) is missing or does not load") from e
            _close(f"device {device}: cuFFT", got_fft, want_fft, 1e-4)
            _check_linalg(cupy, device, rng)
            names.append(str(device))
    return (f"cupy kernels: elementwise (NVRTC), cuFFT, cuBLAS and cuSOLVER (solve, eigh) against numpy on "
            f"device(s) {', '.join(names)}")


def _check_linalg(cupy: Any, device: int, rng: np.random.Generator) -> None:
    """SENSE's solve and ESPIRiT's/the coil maps' eigh run on cuBLAS and cuSOLVER: checked on a small
    Hermitian positive definite system."""
    a = (rng.standard_normal((8, 8)) + 1j * rng.standard_normal((8, 8))).astype(np.complex64)
    h = (a @ a.conj().T + 8 * np.eye(8)).astype(np.complex64)
    b = (rng.standard_normal(8) + 1j * rng.standard_normal(8)).astype(np.complex64)
    try:
        x = cupy.asnumpy(cupy.linalg.solve(cupy.asarray(h), cupy.asarray(b)))
        w = cupy.asnumpy(cupy.linalg.eigh(cupy.asarray(h))[0])
    except Exception as e:
        raise CheckFailed(f"device {device}: cuBLAS/cuSOLVER failed ({type(e).__name__}: {e})",
                          "the cuBLAS and cuSOLVER libraries (nvidia-cublas-cu12, nvidia-cusolver-cu12) are "
                          "missing or do not load") from e
    _close(f"device {device}: cuSOLVER solve", h @ x, b, 1e-4)
    _close(f"device {device}: cuSOLVER eigh", w, np.linalg.eigvalsh(h), 1e-4)


def check_cufinufft() -> str:
    if importlib.util.find_spec("cufinufft") is None:
        return "skip cufinufft: not installed (NUFFTs of device arrays then run on the host with finufft)"
    cupy = _cupy()
    try:
        import cufinufft
    except (ImportError, OSError) as e:  # installed, but its library (or libcudart, libcufft) does not load
        raise CheckFailed(f"cufinufft is installed but cannot be imported ({e})",
                          "libcudart.so.12 and libcufft.so.11 must be on LD_LIBRARY_PATH (the GPU image sets "
                          "it to the nvidia wheels' lib folders)") from e
    import finufft

    rng = np.random.default_rng(5)
    n, m = 16, 200
    x, y = _points(rng, m)
    c = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    f = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    try:
        dx, dy = cupy.asarray(x), cupy.asarray(y)
        got1 = cupy.asnumpy(cufinufft.nufft2d1(dx, dy, cupy.asarray(c), (n, n), eps=1e-9, isign=+1))
        got2 = cupy.asnumpy(cufinufft.nufft2d2(dx, dy, cupy.asarray(f), eps=1e-9, isign=-1))
    except Exception as e:
        raise CheckFailed(f"a cufinufft NUFFT failed ({type(e).__name__}: {e})",
                          "cufinufft's kernels may not support this GPU's architecture, or CUDA is broken") from e
    err1 = _close("type 1", got1, finufft.nufft2d1(x, y, c, (n, n), eps=1e-9, isign=+1), 1e-6)
    err2 = _close("type 2", got2, finufft.nufft2d2(x, y, f, eps=1e-9, isign=-1), 1e-6)
    return (f"cufinufft {getattr(cufinufft, '__version__', '?')}: type 1 and 2 against finufft, "
            f"relative errors {err1:.1e}, {err2:.1e}")


CPU_CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("numpy", check_numpy), ("finufft", check_finufft), ("mrd-file", check_mrd_file),
]
GPU_CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("nvml", check_nvml), ("cupy", check_cupy), ("cupy-kernels", check_cupy_kernels),
    ("cufinufft", check_cufinufft),
]


def run(checks: list[tuple[str, Callable[[], str]]]) -> int:
    for name, check in checks:
        try:
            line = check()
        except CheckFailed as e:
            print(f"reconq selftest: FAILED {name}: {e}", flush=True)
            return 1
        except Exception as e:  # a check that broke in a way it did not foresee fails the same way
            print(f"reconq selftest: FAILED {name}: unexpected {type(e).__name__}: {e}; report it with "
                  "this line", flush=True)
            return 1
        print(line if line.startswith("skip ") else f"ok {line}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconq.workers.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="check the GPU stack first (NVML, cupy, cufinufft)")
    args = parser.parse_args(argv)
    return run((GPU_CHECKS if args.gpu else []) + CPU_CHECKS)


if __name__ == "__main__":
    sys.exit(main())
