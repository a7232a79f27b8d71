"""``reconq demo``: a synthetic multi-coil phantom scan through the whole flow, timed step by step.

Starts a private Redis, the gateway, the API and one CPU worker; sends the scan as a scanner would;
runs a retrieval scan; writes the images as MRD and PNG; compares them with the phantom.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from reconq.core.redisconn import free_port
from reconq.core.settings import Settings
from reconq.stack import Stack

#: The demo fails if the retrieved images differ from the phantom by more than this (normalised RMS).
DEMO_NRMSE_BOUND = 0.05


class Steps:
    """Prints each step with its duration; remembers failures."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"  {name} ...", end="", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" FAILED", flush=True)
            raise
        dt = time.perf_counter() - t0
        self.times.append((name, dt))
        print(f" {dt:.2f} s", flush=True)


def expected_magnitude(truth: np.ndarray, mps: np.ndarray) -> np.ndarray:
    """What a sum-of-squares recon of a noiseless scan gives: the object times the coils' RSS."""
    rss = np.sqrt(np.sum(np.abs(mps) ** 2, axis=0))
    return truth * rss


def nrmse(image: np.ndarray, reference: np.ndarray) -> float:
    """Normalised RMS error after scaling both to unit maximum."""
    a = image / image.max()
    b = reference / reference.max()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def write_pngs(images: list, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for img in images:
        plane = np.asarray(img.data)[0, 0].astype(np.float32)
        scaled = (255 * plane / max(float(plane.max()), 1.0)).astype(np.uint8)
        path = folder / f"series{img.image_series_index}_image{img.image_index:03d}.png"
        PILImage.fromarray(scaled).save(path)
        paths.append(path)
    return paths


def run_demo(settings: Settings, out: Path) -> int:
    import reconq.gateway.client as client
    from reconq.core.results import write_images
    from reconq.recon.simulate import synthetic_scan

    out = out.resolve()
    dashboard = f"http://{settings.http_host}:{settings.http_port}/"
    data_dir = out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    settings = settings.model_copy(update={
        "data_dir": data_dir, "mrd_port": free_port(), "http_port": free_port(), "retrieve_poll_s": 1.0,
    })
    print(f"ReconQ demo: output in {out}")
    steps = Steps()
    stack = Stack(settings, workers=1, log_dir=out / "logs")
    try:
        with steps.step("start Redis, gateway, API and a CPU worker"):
            settings = stack.start()
        with steps.step("simulate a 3-slice, 8-coil 192x192 phantom scan"):
            scan = synthetic_scan(matrix=(192, 192), ncoil=8, nslices=3, protocol="reconq_demo_t1")
        host, port = settings.mrd_host, settings.mrd_port
        with steps.step(f"send {len(scan.acquisitions)} readouts to the gateway (MRD on port {port})"):
            reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
            job_id = reply.job_id()
            if job_id is None or reply.errors():
                raise RuntimeError(f"gateway did not queue the scan: {reply.texts}")
        print(f"    gateway: {reply.texts[-1]}")
        with steps.step("retrieval scan (waits for the recon)"):
            back = client.retrieve(host, port, scan.header)
            if not back.images:
                raise RuntimeError(f"retrieval returned no images: {back.texts}")
        with steps.step("write images as MRD and PNG"):
            write_images(out / "images.h5", back.images)
            pngs = write_pngs(back.images, out / "png")
        got = np.stack([np.asarray(i.data)[0, 0].astype(np.float32) for i in back.images])
        err = nrmse(got, expected_magnitude(scan.truth, scan.mps))
        print(f"  {len(back.images)} images of job {job_id}: normalised RMS error vs phantom {err:.4f} "
              f"(bound {DEMO_NRMSE_BOUND})")
        print(f"  images: {out / 'images.h5'}; PNG: {pngs[0].parent}; logs: {out / 'logs'}")
        print("  to follow jobs in the dashboard, run the stack with `reconq up` and open "
              f"{dashboard}")
        print("  timings: " + ", ".join(f"{n.split(' (')[0]}: {t:.2f} s" for n, t in steps.times))
        if err > DEMO_NRMSE_BOUND:
            print("demo FAILED: images do not match the phantom")
            return 1
        print("demo OK")
        return 0
    except Exception as e:  # noqa: BLE001 - the demo reports any failure and exits non-zero
        print(f"demo FAILED: {e}")
        return 1
    finally:
        stack.stop()
