"""The ``reconq`` command: every entry point builds the settings once and passes them down."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from reconq.core.settings import Settings, SettingsError, load_settings

log = logging.getLogger("reconq")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from reconq.core.datalock import DataDirLock
    from reconq.services import make_gateway

    lock = DataDirLock(settings.data_dir, "gateway").acquire()  # before anything reads or marks a scan
    gw = make_gateway(settings)
    gw.bind()
    signal.signal(signal.SIGTERM, lambda *_: gw.stop())
    try:
        gw.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        gw.stop()
        lock.release()
    if gw.fatal:
        print(f"reconq: {gw.fatal}", file=sys.stderr)
        return 2
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from reconq.api.app import uvicorn_options
    from reconq.core.redisconn import connect
    from reconq.services import make_api

    options = uvicorn_options(settings)  # HTTPS with RECONQ_TLS_CERT/_KEY (a SettingsError if they do not do)
    uvicorn.run(make_api(settings, connect(settings)), host=settings.http_host, port=settings.http_port,
                log_level="info", **options,  # JSON: uvicorn's lines through the root's handlers
                log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from reconq.scheduler.inventory import make_inventory
    from reconq.workers.launcher import LaunchError, launch, run_worker
    from reconq.workers.slot import parse_bind

    if args.bind:  # one process of a launch: bound to one GPU or the CPU
        run_worker(settings, concurrency=1, name=args.name, gpu_index=parse_bind(args.bind))
        return 0
    gpus = None if args.gpus in (None, "all") else [int(g) for g in args.gpus.split(",") if g.strip()]
    try:
        if args.gpus is not None or args.cpu:
            return launch(settings, gpus if args.gpus is not None else [], args.per_gpu, args.cpu)
        if make_inventory(settings).gpus():  # no options on a GPU machine: one process per GPU
            return launch(settings, None, args.per_gpu, 0)
    except LaunchError as e:
        raise CliError(f"worker: {e}", code=2) from e
    run_worker(settings, concurrency=args.concurrency or settings.worker_concurrency)
    return 0


def cmd_gpus(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses

    from reconq.core.redisconn import connect
    from reconq.scheduler.monitor import cluster_status, format_table

    status = cluster_status(connect(settings), forget_s=settings.gpu_forget_s)
    print(json.dumps(dataclasses.asdict(status), indent=2) if args.json else format_table(status))
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from reconq.core.datalock import DataDirLock
    from reconq.core.redisconn import redact
    from reconq.stack import Stack, remove_connection, write_connection

    lock = DataDirLock(settings.data_dir, "up").acquire()  # before its Redis starts on the data dir's AOF
    stack = Stack(settings, workers=args.workers)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        eff = stack.start()

        def record() -> None:  # for client commands in another shell (read by _client_settings)
            write_connection(eff, children=stack.pids())

        record()
        print(f"ReconQ up: MRD on {eff.mrd_host}:{eff.mrd_port}, API on http://{eff.http_host}:{eff.http_port}, "
              f"Redis {redact(eff.redis_url)}, data in {eff.data_dir}. Ctrl-C stops.", flush=True)
        return stack.supervise(on_restart=record)  # a child (or the private Redis) that dies is started again
    except KeyboardInterrupt:
        print("stopping (running recons may finish or are handed back; Ctrl-C again is ignored) ...", flush=True)
        return 0
    finally:
        # a second Ctrl-C must not cut the stop short: it would leave Redis running on the data dir's AOF
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        remove_connection(settings.data_dir)
        lock.release()


class CliError(Exception):
    """A failure the user can fix: printed as one line ``reconq: <message>``, exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


#: Commands that are clients of a running stack, and those of them that need its Redis.
CLIENT_COMMANDS = frozenset({"gpus", "send", "retrieve", "retro", "jobs", "exams", "purge"})
REDIS_COMMANDS = frozenset({"gpus", "retro", "jobs", "exams", "purge"})


def _client_settings(settings: Settings, need_redis: bool) -> Settings:
    """``settings`` completed from the connection file of a running ``reconq up`` on the data dir: its Redis
    when ``RECONQ_REDIS_URL`` is unset, its MRD and HTTP addresses when their variables are unset."""
    from reconq.core.settings import ENV_PREFIX
    from reconq.stack import CONNECTION_FILE, read_connection

    doc, stale = read_connection(settings.data_dir)
    if doc is not None:
        update: dict[str, Any] = {}
        if not settings.redis_url and doc.get("redis_url"):
            update.update(redis_url=doc["redis_url"], redis_password_file=None,
                          redis_ca_file=Path(str(doc["redis_ca_file"])) if doc.get("redis_ca_file") else None)
        for name in ("mrd_host", "mrd_port", "http_host", "http_port"):
            if ENV_PREFIX + name.upper() not in os.environ and doc.get(name) is not None:
                update[name] = doc[name]
        return settings.model_copy(update=update)
    if need_redis and not settings.redis_url:
        data_dir = settings.data_dir.resolve()
        hint = f" (a stale {data_dir / CONNECTION_FILE} left by a stopped reconq up)" if stale else ""
        raise CliError(f"RECONQ_REDIS_URL is not set and no running `reconq up` was found in {data_dir}{hint}; "
                       "start `reconq up` or set RECONQ_REDIS_URL", code=1)
    return settings


def _mrd_file(path: str, what: str = "file", raw: bool = False) -> Path:
    """``path`` checked to be a readable MRD (ISMRMRD HDF5) file with a header, or a :class:`CliError`."""
    import h5py

    file = Path(path)
    if not file.is_file():
        raise CliError(f"{what} {path}: no such file; give the path of a raw MRD (ISMRMRD HDF5) file")
    try:
        if not h5py.is_hdf5(file):
            raise CliError(f"{what} {path} is not an HDF5 file; give a raw MRD (ISMRMRD HDF5) file")
        with h5py.File(file, "r") as f:
            group = f.get("dataset")
            ok = isinstance(group, h5py.Group) and "xml" in group
            readouts = ok and "data" in group
            images = isinstance(group, h5py.Group) and any(k.startswith("image_") for k in group)
    except OSError as e:
        raise CliError(f"{what} {path} cannot be read: {e}") from e
    if images and (raw or not ok):
        raise CliError(f"{what} {path} is an MRD image file (images, no raw readouts); "
                       "give a raw MRD scan (an MRD file with /dataset/data)")
    if not ok:
        raise CliError(f"{what} {path} is HDF5 but not an MRD file (no /dataset/xml header); "
                       "give a raw MRD (ISMRMRD HDF5) file")
    if raw and not readouts:
        raise CliError(f"{what} {path} is an MRD file without raw readouts; "
                       "give a raw MRD scan (an MRD file with /dataset/data)")
    return file


def _json_params(text: str | None, option: str = "--params") -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{option} {text!r} is not JSON: {e.msg} at character {e.pos + 1} "
                       f"({text[e.pos:e.pos + 10]!r}); write it as JSON, e.g. "
                       """--params '{"maps": "walsh"}'""", code=2) from e
    if not isinstance(value, dict):
        raise CliError(f"{option} must be a JSON object, e.g. --params '{{\"maps\": \"walsh\"}}'", code=2)
    return value


def _mrd_address(settings: Settings, args: argparse.Namespace) -> tuple[str, int]:
    return args.host or settings.mrd_host, args.port or settings.mrd_port


def _reply_code(reply: Any) -> int:
    return 1 if reply.errors() or not reply.closed else 0


def _progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, shown on a terminal only (not in pipes, logs or tests); ``TQDM_DISABLE=1`` hides
    it there too."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, leave=False, **kwargs)


def _print_text(bar: Any) -> Callable[[str], None]:
    """Print a server TEXT as it comes, above the bar."""
    def show(text: str) -> None:
        if bar.disable:
            print(text, flush=True)
        else:
            bar.write(text, file=sys.stdout)
    return show


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    import ismrmrd

    from reconq.gateway.client import send_file

    params = _json_params(args.params)
    file = _mrd_file(args.file, raw=True)
    with ismrmrd.Dataset(str(file), "dataset", create_if_needed=False, mode="r") as dset:
        names = dset.list()
        total = (dset.number_of_acquisitions() if "data" in names else 0) + (
            dset.number_of_waveforms() if "waveforms" in names else 0)
    with _progress_bar(total=total, unit=" readouts", desc=f"send {file.name}") as bar:
        reply = send_file(*_mrd_address(settings, args), file, config=args.config, params=params,
                          on_sent=lambda _n: bar.update(1), on_text=_print_text(bar))
    return _reply_code(reply)


def cmd_retrieve(settings: Settings, args: argparse.Namespace) -> int:
    import ismrmrd

    from reconq.core.results import write_images
    from reconq.gateway import client

    if args.from_file:
        raw = str(_mrd_file(args.from_file, "--from-file"))
        with ismrmrd.Dataset(raw, "dataset", create_if_needed=False, mode="r") as dset:
            xml = dset.read_xml_header()
        header = xml.decode() if isinstance(xml, bytes) else xml
    else:
        if not (args.patient and args.protocol):
            raise CliError("retrieve: give --from-file RAW.h5, or --patient and --protocol (and --study)", code=2)
        header = client.retrieval_header(args.patient, args.study or "", args.protocol)
    params = {"job": args.job} if args.job else None
    with _progress_bar(unit=" images", desc="retrieve") as bar:
        reply = client.retrieve(*_mrd_address(settings, args), header, params=params, on_text=_print_text(bar),
                                on_image=lambda _image, _n: bar.update(1))
    code = _reply_code(reply)
    if reply.images:
        write_images(Path(args.out), reply.images)
        print(f"{len(reply.images)} images written to {args.out}")
    return code if reply.images else 1


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from reconq.core.jobs import JobStore
    from reconq.core.redisconn import connect
    from reconq.core.states import JobState

    store = JobStore(connect(settings))
    jobs, total = store.query(limit=args.limit, state=JobState(args.state) if args.state else None)
    if args.json:  # as GET /api/jobs for staff
        from reconq.api.schemas import JobOut, JobPage

        page = JobPage(total=total, offset=0, limit=args.limit, jobs=[JobOut.of(j, None) for j in jobs])
        print(page.model_dump_json(indent=2))
        return 0
    print(f"{'job':34} {'state':15} {'progress':>8}  {'pipeline':12} {'protocol':20} stage / error")
    for j in jobs:
        print(f"{j.id:34} {j.state.value:15} {100 * j.progress:7.0f}%  {j.pipeline:12} {j.protocol[:20]:20} "
              f"{j.error or j.stage}")
    print(f"({len(jobs)} of {total} jobs)")
    return 0


def cmd_exams(settings: Settings, args: argparse.Namespace) -> int:
    """One day's exams: per series its state and progress, and when its images are expected."""
    import time
    from datetime import date

    from reconq.api.schemas import ExamDay, ExamOut
    from reconq.core.jobs import JobStore
    from reconq.core.redisconn import connect
    from reconq.scheduler.exams import day_bounds, exams_of_day

    try:
        day = date.fromisoformat(args.day) if args.day else date.today()
    except ValueError:
        raise CliError(f"exams: --day {args.day!r} is not a date; give YYYY-MM-DD", code=2) from None
    store = JobStore(connect(settings))
    exams = exams_of_day(store, store.redis, *day_bounds(day), time.time())
    if args.json:  # as GET /api/exams for staff
        print(ExamDay(day=day.isoformat(), exams=[ExamOut.of(e, None) for e in exams]).model_dump_json(indent=2))
        return 0
    for exam in exams:
        who = f"{exam.patient_id} / {exam.study_uid}" if exam.identified else f"(no patient or study) {exam.patient_id}"
        print(f"{who.strip()}  since {time.strftime('%H:%M', time.localtime(exam.first_at))}")
        for s in exam.series:
            print(f"  {s.protocol[:20]:20} {s.pipeline:12} {s.state:15} {100 * s.progress:4.0f}%  {_when(s)}")
    print(f"({len(exams)} exams on {day.isoformat()})")
    return 0


def _when(series: Any) -> str:
    """A series' line end: ready, its error, its expected finish as local HH:MM, or its queue place."""
    import time

    if series.ready:
        return "ready to retrieve"
    if series.error:
        return series.error
    place = f" (#{series.queue_position + 1} in its queue)" if series.queue_position is not None else ""
    if series.expected_finish is None:
        return "expected: not known" + place
    return f"expected {time.strftime('%H:%M', time.localtime(series.expected_finish))}{place}"


def cmd_retro(settings: Settings, args: argparse.Namespace) -> int:
    """A new job on a stored scan with another pipeline or parameters (run where the data folder is)."""
    import getpass

    from reconq.core.constants import Queue
    from reconq.scheduler.actions import ActionError
    from reconq.services import build_services

    actions = build_services(settings).actions
    try:
        jobs = actions.retro_recon_many(args.scan_id, args.pipeline,
                                        _json_params(args.params), Queue(args.queue),
                                        who=f"cli:{getpass.getuser()}")
    except ActionError as e:  # no such scan, an unknown pipeline, a scan not complete
        raise CliError(f"retro: {e}{_scan_hint(settings, args.scan_id)}") from e
    for job in jobs:
        if job.state.finished:  # its scan's raw data purged as it was made
            print(f"job {job.id} {job.state.value}: {job.error}")
        else:
            print(f"job {job.id} queued on {job.queue}: pipeline {job.pipeline} on scan {job.scan_id}")
    return 1 if any(job.state.finished for job in jobs) else 0


def _scan_hint(settings: Settings, names: list[str]) -> str:
    """For names that are job ids, not scan ids: which scans they are jobs on, as a command to run."""
    from reconq.core.jobs import JobStore
    from reconq.core.redisconn import connect

    store = JobStore(connect(settings))
    scans = {name: job.scan_id for name in names if (job := store.get(name)) is not None}
    if not scans:
        return ""
    said = ", ".join(f"{name} is a job on scan {scan}" for name, scan in scans.items())
    fixed = " ".join(scans.get(name, name) for name in names)
    return f"; {said}: retro takes scan ids, e.g. `reconq retro {fixed} --pipeline ...`"


def cmd_sequences(settings: Settings, args: argparse.Namespace) -> int:
    """The Pulseq sequence folder: add signed ``.seq`` files, list what it holds and whether each verifies."""
    from reconq.recon.errors import ReconError
    from reconq.recon.pulseq import SequenceLibrary, seq_signature

    library = SequenceLibrary(settings.sequence_folder)
    if args.sequences_command == "add":
        print(f"sequence folder {library.folder}")
        for file in args.files:
            try:
                dest = library.add(file)
                signature = seq_signature(dest).computed
            except ReconError as e:  # missing, not a .seq, not signed, signature mismatch, name taken
                print(f"reconq: {e}", file=sys.stderr)
                return 2
            print(f"{dest.name}  {signature}  verified")
        return 0
    entries = library.entries()
    if getattr(args, "json", False) or args.sequences_json:
        print(json.dumps({"folder": str(library.folder), "sequences": [e.as_dict() for e in entries]}, indent=2))
        return 0
    print(f"sequence folder {library.folder}")
    for entry in entries:
        adc = f"  {entry.adc_events} ADC events, {entry.adc_samples} samples" if entry.adc_events is not None else ""
        state = "verified" if entry.verified else f"NOT verified: {entry.reason}"
        print(f"{entry.name}  {entry.recorded or '-'}  {state}{adc}")
    print(f"({len(entries)} files, {sum(e.verified for e in entries)} verified)")
    return 0


def cmd_settings(settings: Settings, args: argparse.Namespace) -> int:
    """Every setting: its variable, default, value here (secrets masked) and what it means."""
    from reconq.core.settings import describe_settings

    rows = describe_settings(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def show(v: object) -> str:
        return "unset" if v is None else json.dumps(v) if isinstance(v, list | dict | bool) else str(v)

    for row in rows:
        value = show(row["value"])
        mark = " (set)" if row["set"] else ""
        print(f"{row['variable']} = {value}{mark}   [default {show(row['default'])}]\n    {row['description']}")
    print(f"({len(rows)} settings; set them as environment variables)")
    return 0


#: ``reconq simulate --orientation``: (read, phase, slice) directions in patient coordinates (LPS)
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
}


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    """A synthetic raw MRD scan of a head phantom, with a full identity, to send to the gateway."""
    import time

    from pydicom.uid import generate_uid

    from reconq.recon.errors import ReconError
    from reconq.recon.simulate import SyntheticScan, synthetic_scan, write_mrd

    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; give another name or --force to replace it", code=2)
    if not out.parent.is_dir():
        raise CliError(f"{out.parent}: no such folder", code=2)
    n = args.matrix
    if not 8 <= n <= 1024 or args.coils < 1 or args.slices < 1 or args.acceleration < 1:
        raise CliError("simulate: --matrix takes 8..1024, --coils, --slices and --acceleration at least 1", code=2)
    identity = dict(patient_id=args.patient_id, patient_name=args.patient_name,
                    study_uid=args.study_uid or generate_uid(), protocol=args.protocol,
                    measurement_id=f"66001_{int(time.time()) % 10**7}_{os.getpid() % 10**7}_1")  # one per file
    try:
        scan: SyntheticScan
        if args.radial:
            import numpy as np

            from reconq.recon import radial
            from reconq.recon.phantoms import Phantom
            from reconq.recon.radialsim import radial_scan

            if args.slices != 1 or args.acceleration != 1:
                raise CliError("simulate --radial makes one 2D slice: --slices and --acceleration do not apply "
                               "(undersample with --spokes)", code=2)
            phantom = Phantom.default(2, ncoil=args.coils, seed=args.seed)
            spokes = args.spokes or int(np.pi / 2 * n)
            coord = radial.radial_2d(spokes, 2 * n, n / 2, golden=True)
            scan = radial_scan(coord, lambda c, e: phantom.kspace(c, te_ms=0.0), ncoil=args.coils,
                               matrix=(n, n, 1), fov_mm=(args.fov, args.fov, 5.0), kind="2d", noise=args.noise,
                               seed=args.seed, **identity)
        else:
            read, phase, slc = ORIENTATIONS.get(args.orientation, ORIENTATIONS["axial"])
            rotation = None
            if args.orientation == "oblique":  # the slice normal tilted about x, then y
                from scipy.spatial.transform import Rotation

                rotation = Rotation.from_euler("xy", [20.0, 15.0], degrees=True).as_matrix()
            scan = synthetic_scan(matrix=(n, n), ncoil=args.coils, nslices=args.slices,
                                  fov_mm=(args.fov, args.fov, 5.0), read_dir=read, phase_dir=phase, slice_dir=slc,
                                  rotation=rotation,
                                  acceleration=(args.acceleration, 1), acs_lines=(args.acs, 1), noise=args.noise,
                                  seed=args.seed, **identity)
    except ReconError as e:
        raise CliError(f"simulate: {e}", code=2) from e
    write_mrd(scan, out)
    kind = f"2D radial, {len(scan.acquisitions)} spokes" if args.radial else (
        f"{args.orientation} Cartesian, {args.slices} slice(s)"
        + (f", accelerated R={args.acceleration} with {args.acs} calibration lines" if args.acceleration > 1 else ""))
    print(f"{out}: {kind}, {n}x{n}, {args.coils} coils, {len(scan.acquisitions)} readouts; patient "
          f"{args.patient_id}, protocol {args.protocol}")
    pipeline = "radial" if args.radial else "sense" if args.acceleration > 1 else "cartesian"
    print(f"send it: reconq send {out} --config {pipeline}")
    return 0


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Apply the retention settings now (``--dry-run``: only list what is due), as the gateway does
    every ``RECONQ_PURGE_INTERVAL_S``."""
    from reconq.core.redisconn import connect
    from reconq.scheduler.retention import run_purge

    report = run_purge(settings, connect(settings), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            print(line)
        if report.off:
            print("(the RECONQ_KEEP_* settings of this shell; the gateway purges with its own)")
    failed = [k for k in report.kept if k.why.startswith("not deleted")]
    if report.skipped or failed:  # another purge held the lock, or files that could not be deleted
        raise CliError(f"purge: {report.skipped or f'{len(failed)} item(s) not deleted (see above)'}; "
                       "try again later")
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from reconq.demo import run_demo

    if not args.verbose:  # the demo prints its own steps; the services log to files
        logging.getLogger().setLevel(logging.WARNING)
    return run_demo(settings, Path(args.out))


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (with a "did you mean" for a mistyped choice)."""

    def error(self, message: str) -> NoReturn:
        import difflib
        import re

        m = re.search(r"invalid choice: '?([^'\s]*)'? \(choose from (.*)\)", message)
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            message = message[:m.start()] + f"invalid choice {m.group(1)!r}" + (
                f"; did you mean {close[0]}?" if close else "") + f" (choose from {', '.join(choices)})"
        where = self.prog.removeprefix("reconq").strip()
        self.exit(2, f"reconq: {where + ': ' if where else ''}{message}; see `{self.prog} --help`\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reconq")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reconq", description="Asynchronous inline MRI reconstruction",
                     epilog="Settings are environment variables RECONQ_*: `reconq settings` lists every one with its "
                            "default, its value here and what it means. Start with `reconq up` in one shell, then "
                            "`reconq simulate raw.h5` and `reconq send raw.h5` in another.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"reconq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[Settings, argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("up", cmd_up, "run Redis (private if RECONQ_REDIS_URL is unset), gateway, API and workers")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    add("gateway", cmd_gateway, "run the MRD gateway")
    add("api", cmd_api, "run the HTTP API")
    p = add("worker", cmd_worker, "run recon workers: one process per GPU slot and CPU worker")
    p.add_argument("--concurrency", type=int, default=0,
                   help="pool processes of a plain CPU worker on a machine without GPUs (default: the setting)")
    p.add_argument("--gpus", default=None,
                   help="GPU indices (PCI bus order; simulated GPUs with RECONQ_SIMULATED_GPUS), e.g. 0,1, or all")
    p.add_argument("--per-gpu", default="1",
                   help="worker processes per GPU: N, one count per GPU (N,N,...), or auto (default 1)")
    p.add_argument("--cpu", type=int, default=0, help="CPU worker processes (default 0)")
    p.add_argument("--bind", default=None, help=argparse.SUPPRESS)  # gpu:<i> | cpu: one launched process
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p = add("gpus", cmd_gpus, "GPUs, what runs on each, and the jobs waiting for GPU memory")
    p.add_argument("--json", action="store_true", help="print JSON (as GET /api/gpus)")
    for name, func, help in (("send", cmd_send, "stream an MRD file to the gateway as a scanner would"),
                             ("retrieve", cmd_retrieve, "run a retrieval scan and save the images")):
        p = add(name, func, help)
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
    p = sub.choices["send"]
    p.add_argument("file", help="raw MRD (ISMRMRD HDF5) file")
    p.add_argument("--config", default=None, help="pipeline / config name (default: the gateway's default)")
    p.add_argument("--params", default=None, help="JSON parameters sent as a TEXT after the header")
    p = sub.choices["retrieve"]
    p.add_argument("--from-file", default=None, help="take patient, study and protocol from this MRD file")
    p.add_argument("--patient", default=None)
    p.add_argument("--study", default=None)
    p.add_argument("--protocol", default=None)
    p.add_argument("--job", default=None, help="ask for this job id instead of matching")
    p.add_argument("--out", required=True, help="MRD file to write the images to")
    p = add("retro", cmd_retro, "retro-recon: a new job on each stored scan named, with another pipeline or "
                                "parameters (several scans are placed as one batch)")
    p.add_argument("scan_id", nargs="+", help="the stored scan(s) (see `reconq jobs` or the dashboard)")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--params", default=None, help="JSON parameters of the new job")
    p.add_argument("--queue", default="bulk", choices=["stat", "routine", "bulk"])
    p = add("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--state", default=None, choices=["receiving", "queued", "waiting_inputs", "running", "done",
                                                     "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print JSON (as GET /api/jobs for staff)")
    p = add("exams", cmd_exams, "one day's exams: each series' state, progress and expected finish")
    p.add_argument("--day", default=None, help="YYYY-MM-DD (default: today, local time)")
    p.add_argument("--json", action="store_true", help="print JSON (as GET /api/exams)")
    p = add("sequences", cmd_sequences, "the Pulseq .seq files scans' trajectories come from: add, list")
    seqs = p.add_subparsers(dest="sequences_command")  # none: list
    q = seqs.add_parser("add", help="copy signed .seq files into the sequence folder",
                        description="copy signed .seq files into the sequence folder")
    q.add_argument("files", nargs="+", metavar="FILE", help="Pulseq .seq file(s)")
    q = seqs.add_parser("list", help="the folder's .seq files, their signatures, whether each verifies",
                        description="the folder's .seq files, their signatures, whether each verifies")
    q.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--json", dest="sequences_json", action="store_true", help="print JSON (list)")
    p = add("settings", cmd_settings, "every setting: its RECONQ_ variable, default, value here and meaning")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("simulate", cmd_simulate, "write a synthetic raw MRD scan (a head phantom, with patient, study and "
                                      "protocol) to send with `reconq send`")
    p.add_argument("out", metavar="OUT.h5", help="the MRD file to write")
    p.add_argument("--coils", type=int, default=8, help="receive coils (default 8)")
    p.add_argument("--slices", type=int, default=1, help="2D slices (default 1)")
    p.add_argument("--matrix", type=int, default=128, help="image matrix N (N x N, default 128)")
    p.add_argument("--fov", type=float, default=256.0, help="field of view in mm (default 256)")
    p.add_argument("--acceleration", type=int, default=1,
                   help="parallel imaging: every R-th phase line, with calibration lines (default 1: none)")
    p.add_argument("--acs", type=int, default=24, help="calibration lines when accelerated (default 24)")
    p.add_argument("--orientation", default="axial", choices=["axial", "coronal", "sagittal", "oblique"])
    p.add_argument("--radial", action="store_true", help="a 2D golden-angle radial scan (pipeline radial)")
    p.add_argument("--spokes", type=int, default=0, help="radial spokes (default pi/2 N: fully sampled)")
    p.add_argument("--noise", type=float, default=0.0, help="k-space noise std (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patient-id", default="PAT001")
    p.add_argument("--patient-name", default="Phantom^Demo", help="DICOM style: Family^Given")
    p.add_argument("--study-uid", default=None, help="default: a new UID, one study per file")
    p.add_argument("--protocol", default="reconq_sim", help="protocol name (the retrieval scan matches it)")
    p.add_argument("--force", action="store_true", help="replace OUT.h5 if it exists")
    p = add("purge", cmd_purge, "delete what the retention settings (RECONQ_KEEP_*_DAYS) say is due; never a scan "
                                "with a job not ended")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = add("demo", cmd_demo, "a synthetic scan through the whole flow, on a private Redis and CPU workers")
    p.add_argument("--out", default="reconq-demo", help="output folder (default ./reconq-demo)")
    return parser


#: Files and folders every ReconQ process makes (scans, results, the private Redis's AOF, logs) are
#: its user's alone: 0600 and 0700. Set before anything is made; child processes inherit it.
UMASK = 0o077


def main(argv: list[str] | None = None) -> int:
    os.umask(UMASK)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        settings = load_settings()
        if settings.redis_password_file is not None:  # read once, here: its password goes into the URL
            from reconq.core.redisconn import with_redis_credentials

            settings = with_redis_credentials(settings)
    except (SettingsError, ValueError) as e:
        print(f"reconq: {e}", file=sys.stderr)
        return 2
    from reconq.core.logs import configure_logging

    configure_logging(settings.log_format)  # the job filter, and JSON lines with RECONQ_LOG_FORMAT=json
    from reconq.core.datalock import DataDirBusy
    from reconq.core.dataroot import DataRootError

    try:
        if args.command in CLIENT_COMMANDS:
            settings = _client_settings(settings, need_redis=args.command in REDIS_COMMANDS)
        return int(args.func(settings, args))
    except (SettingsError, DataDirBusy, DataRootError) as e:  # DataRootError: not the recorded data root
        if args.debug:
            raise
        print(f"reconq: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        if args.debug:
            raise
        print(f"reconq: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("reconq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if args.command in ("send", "retrieve"):  # the MRD connection, not our output
            print(f"reconq: {_failure(ConnectionError('the gateway closed the connection'), settings, args)}",
                  file=sys.stderr)
            return 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # output piped into `head`, say
        return 0
    except Exception as e:  # one line, not a traceback (that with --debug)
        if args.debug:
            raise
        print(f"reconq: {_failure(e, settings, args)}", file=sys.stderr)
        return 1


def _failure(e: Exception, settings: Settings, args: argparse.Namespace) -> str:
    """One line for an unexpected failure: what is wrong and what to do."""
    import redis

    from reconq.core.redisconn import redact

    if isinstance(e, redis.AuthenticationError | redis.ResponseError):
        return f"Redis at {redact(settings.redis_url)} refused: {e}; check RECONQ_REDIS_URL's credentials"
    if isinstance(e, redis.ConnectionError | redis.TimeoutError):
        return (f"cannot reach Redis at {redact(settings.redis_url)}: {e}; is `reconq up` (or your Redis) running? "
                "check RECONQ_REDIS_URL")
    if isinstance(e, ConnectionRefusedError) and args.command in ("send", "retrieve"):
        host, port = _mrd_address(settings, args)
        return (f"no MRD gateway listening on {host}:{port} (connection refused); start `reconq up` "
                "or give --host/--port (RECONQ_MRD_PORT)")
    if isinstance(e, OSError) and args.command in ("send", "retrieve"):
        host, port = _mrd_address(settings, args)
        return f"MRD session with {host}:{port} failed: {e}; check the gateway is running and reachable"
    return f"{type(e).__name__}: {e}; run `reconq --debug {args.command}` for the traceback"


if __name__ == "__main__":
    sys.exit(main())
