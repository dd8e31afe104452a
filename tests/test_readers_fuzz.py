"""Reader fuzz corpus: every format the dispatcher knows, corrupted, must give valid events or EventFormatError.

Each seed is a small valid file (built by the format's own test module, or a real recording cut to a few KB). Its
corruptions (truncations, bit flips, overwritten runs, random bytes) and hand-made hostile files (huge claimed sizes,
absurd header geometry, headerless noise) are read in a child process whose address space is capped at
``MEMORY_BOUND`` above what it holds after importing the readers, with a time bound per case. A case passes when the
reader returns events that satisfy the contract or raises EventFormatError not caused by running out of memory;
anything else, a crash of the child, or a case over its time bound fails the test, naming the case.
"""

import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from event_testing import REAL
from hypothesis import given, settings
from hypothesis import strategies as st
from test_readers_aedat_legacy import dvs128_address, encode_aedat2, encode_aedat3
from test_readers_binary import encode_bin, encode_dat
from test_readers_ddd17 import write_sequence
from test_readers_faery import write_with_faery
from test_readers_hdf5 import write_dsec, write_mvsec
from test_readers_npz import es_imagenet_npz, n_imagenet_npz

from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers._io import load_npy, load_npz

MEMORY_BOUND = 256 << 20  # bytes of address space a read may add to the child's
CASE_TIME_BOUND_S = 10.0  # generous: an AEDAT4 read starts a child process to open its header (about 1 s)
SRC = Path(__file__).resolve().parents[1] / "src"

# The child: cap the address space, then read every case and report one JSON line per case as soon as it is done.
WORKER = r"""
import json, resource, sys, time, traceback
import h5py, hdf5plugin, faery, numpy as np
from evpretrain.events.contract import EventFormatError, validate_events
from evpretrain.events.readers import Ddd17Events, read_recording

def address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

bound = address_space() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (bound, bound))
for line in open(sys.argv[1]):
    case = json.loads(line)
    start = time.perf_counter()
    result = {"id": case["id"]}
    try:
        if case["format"] == "ddd17_index":
            Ddd17Events(case["path"]).image_index(50)
            result["outcome"] = "read"
        else:
            recording = read_recording(case["path"], format=case["format"])
            validate_events(recording.events, sensor_size=recording.sensor_size)
            result["outcome"] = "read"
    except EventFormatError as error:
        chain, memory = error, False
        while chain is not None:
            memory |= isinstance(chain, MemoryError)
            chain = chain.__cause__ or chain.__context__
        outcome = "memory" if memory else "error"
        result |= {"outcome": outcome, "offset": error.offset is not None, "message": str(error)}
    except BaseException as error:
        result |= {"outcome": "crash", "message": "".join(traceback.format_exception(error))[-2000:]}
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
"""


# --- seeds: small valid files of every format --------------------------------------------------------------------


def _seeds(folder: Path) -> list[tuple[str, str, Path, str]]:
    """(seed name, format, path to read, file to corrupt relative to it): "" for a file, a file of a DDD17 folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 40
    t = np.sort(rng.integers(0, 50_000, n))
    x, y, on = rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)
    seeds = []

    def put(name, fmt, path, inside=""):
        seeds.append((name, fmt, Path(path), inside))

    (folder / "s.bin").write_bytes(encode_bin(x, y, on, t))
    put("bin", "bin", folder / "s.bin")
    (folder / "s.dat").write_bytes(encode_dat(t, x, y, on))
    put("dat", "dat", folder / "s.dat")
    put("dat_faery", "dat_faery", shutil.copy(folder / "s.dat", folder / "f.dat"))
    n_imagenet_npz(folder / "ni.npz", x, y, t, on)  # compressed, structured 'event_data'
    put("n_imagenet", "n_imagenet", folder / "ni.npz")
    n_imagenet_npz(folder / "nc.npz", x, y, t, on, layout="columns")  # stored, four columns
    put("n_imagenet_columns", "n_imagenet", folder / "nc.npz")
    es_imagenet_npz(folder / "es.npz", np.stack([x % 200 + 17, y % 200 + 17, on + 1], 1), [[20, 30, 3]])
    put("es_imagenet", "es_imagenet", folder / "es.npz")
    write_dsec(folder / "d.h5", t, x, y, on)
    put("dsec", "dsec", folder / "d.h5")
    write_mvsec(folder / "m.hdf5", np.stack([x, y, 1.5e9 + t / 1e6, on * 2 - 1], 1))
    put("mvsec", "mvsec", folder / "m.hdf5")
    index = np.stack([t * 1000, np.arange(n), np.arange(n)], 1)
    sequence = write_sequence(folder / "ddd17", t * 1000, x, y, on, index=index)
    put("ddd17 events.dat.t", "ddd17", sequence, "events.dat.t")
    put("ddd17 events.dat.xyp", "ddd17", sequence, "events.dat.xyp")
    put("ddd17 index", "ddd17_index", sequence, "index/index_50ms.npy")
    (folder / "s2.aedat").write_bytes(encode_aedat2(dvs128_address(x, y, on), t))
    put("aedat2", "aedat2", folder / "s2.aedat")
    (folder / "s3.aedat").write_bytes(encode_aedat3(x, y, on, t))
    put("aedat3", "aedat3", folder / "s3.aedat")
    for version in ("evt2", "evt3"):
        put(version, "raw", write_with_faery(folder / f"{version}.raw", t, x, y, on == 1, version=version))
    put("es", "es", write_with_faery(folder / "s.es", t - t[0], x, y, on == 1))
    put("aedat4", "aedat4", write_with_faery(folder / "s.aedat4", t, x, y, on == 1))
    if REAL.is_dir():  # real recordings, cut to their header and a few KB of events
        for name, fmt, keep in (("evt3.raw", "raw", 4096), ("evt2.raw", "raw", 4096), ("gen4.dat", "dat", 8 * 400)):
            blob = (REAL / name).read_bytes()
            header = blob.index(b"\n% end\n") + 7 if b"\n% end\n" in blob[:4096] else _header_end(blob)
            (folder / f"real_{name}").write_bytes(blob[: header + (2 if fmt == "dat" else 0) + keep])
            put(f"real {name}", fmt, folder / f"real_{name}")
    return seeds


def _header_end(blob: bytes) -> int:
    """Length of the '%' header lines at the start of a Prophesee file."""
    position = 0
    while blob[position : position + 1] == b"%":
        position = blob.index(b"\n", position) + 1
    return position


def _mutations(blob: bytes, rng: np.random.Generator, count: int) -> list[tuple[str, bytes]]:
    """About ``count`` corruptions of ``blob``: truncations, single-bit flips (a third of them within the first 64
    bytes, where headers and sizes live), overwritten 16-byte runs and random bytes (also after the first 16 bytes
    of the original, so that magic-byte detection still picks the format)."""
    size = len(blob)
    out = [(f"cut {cut}", blob[:cut]) for cut in sorted({int(c) for c in np.linspace(0, size - 1, count // 3)})]
    for _ in range(count // 3):
        position = int(rng.integers(0, min(size, 64))) if rng.random() < 1 / 3 else int(rng.integers(0, size))
        bit = int(rng.integers(0, 8))
        flipped = bytearray(blob)
        flipped[position] ^= 1 << bit
        out.append((f"flip byte {position} bit {bit}", bytes(flipped)))
    for _ in range(max(count // 6, 1)):
        position = int(rng.integers(0, max(size - 16, 1)))
        out.append((f"overwrite 16 bytes at {position}", blob[:position] + rng.bytes(16) + blob[position + 16 :]))
    out.append(("random bytes", rng.bytes(size)))
    out.append(("random bytes after 16", blob[:16] + rng.bytes(max(size - 16, 0))))
    return out


# --- hostile files: sizes and geometry claimed far beyond the bytes ---------------------------------------------


def _npy_header(shape, dtype) -> bytes:
    buffer = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _hostile(folder: Path) -> list[tuple[str, str, Path, str]]:
    """(name, format, path, expected message) of files that claim sizes or geometry their bytes cannot hold."""
    folder.mkdir(parents=True)
    cases = []
    huge = 10**12
    # HDF5: chunked datasets whose chunks were never written read as fill values: 5 KB can claim 10^12 events.
    with h5py.File(folder / "dsec_huge.h5", "w") as file:
        for key, dtype in (("x", "u2"), ("y", "u2"), ("t", "u4"), ("p", "u1")):
            file.create_dataset(f"events/{key}", shape=(huge,), dtype=dtype, chunks=(1 << 16,))
        file.create_dataset("ms_to_idx", data=np.zeros(3, np.uint64))
    cases.append(("dsec 10^12 events", "dsec", folder / "dsec_huge.h5", r"'events/x' claims shape \(1000000000000,\)"))
    # Compressed, with one chunk written: 10^9 claimed events from a few hundred stored bytes exceed any deflate ratio.
    with h5py.File(folder / "dsec_gzip.h5", "w") as file:
        for key, dtype in (("x", "u2"), ("y", "u2"), ("t", "u4"), ("p", "u1")):
            column = file.create_dataset(
                f"events/{key}", shape=(10**9,), dtype=dtype, chunks=(1 << 12,), compression="gzip"
            )
            column[:10] = 1
        file.create_dataset("ms_to_idx", data=np.zeros(3, np.uint64))
    cases.append(("dsec gzip 10^9 events", "dsec", folder / "dsec_gzip.h5", r"stores \d+ bytes of it \(compressed"))
    with h5py.File(folder / "mvsec_huge.hdf5", "w") as file:
        file.create_dataset("davis/left/events", shape=(huge, 4), dtype="f8", chunks=(1024, 4))
    cases.append(("mvsec 10^12 rows", "mvsec", folder / "mvsec_huge.hdf5", r"'davis/left/events' claims shape"))
    # npz: a member's .npy header claims 10^12 events; stored and deflated members.
    table = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])
    for method, label in ((zipfile.ZIP_STORED, "stored"), (zipfile.ZIP_DEFLATED, "deflated")):
        path = folder / f"nin_{label}.npz"
        with zipfile.ZipFile(path, "w", method) as archive:
            archive.writestr("event_data.npy", _npy_header((huge,), table) + bytes(130))
        cases.append((f"n_imagenet {label} header 10^12", "n_imagenet", path, r"claims shape \(1000000000000,\)"))
    # ... and the zip's local and central headers claim 4 GB uncompressed: more than deflate's ratio allows.
    blob = bytearray((folder / "nin_deflated.npz").read_bytes())
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = blob.index(signature) + size_at
        blob[at : at + 4] = struct.pack("<I", 0xFFFFFFF0)
    (folder / "nin_sizes.npz").write_bytes(blob)
    cases.append(("n_imagenet 4 GB member", "n_imagenet", folder / "nin_sizes.npz", r"4294967280 bytes uncompressed"))
    # DDD17's image index: a .npy header claiming 10^12 rows.
    sequence = write_sequence(folder / "ddd17_huge", [0, 1], [0, 1], [0, 1], [0, 1])
    (sequence / "index").mkdir()
    (sequence / "index" / "index_50ms.npy").write_bytes(_npy_header((huge, 3), "<i8") + bytes(48))
    cases.append(("ddd17 index 10^12 rows", "ddd17_index", sequence, r"claims shape \(1000000000000, 3\)"))
    # AEDAT4: one flipped bit makes a packet (or the IOHeader) claim a gigabyte.
    aedat4 = write_with_faery(folder / "a.aedat4", [1, 2, 3], [1, 2, 3], [4, 5, 6], [True, False, True]).read_bytes()
    header = struct.unpack_from("<I", aedat4, 14)[0]
    for name, at in (("IOHeader length", 14), ("packet length", 18 + header + 4)):
        flipped = bytearray(aedat4)
        flipped[at + 3] ^= 0x40
        (folder / f"a4_{at}.aedat4").write_bytes(flipped)
        cases.append((f"aedat4 {name} bit 30", "aedat4", folder / f"a4_{at}.aedat4", r"claims 10\d{8} bytes"))
    # Prophesee headers: a 10^20-pixel-wide DAT sensor; RAW noise without a header; a RAW header naming no encoding.
    (folder / "wide.dat").write_bytes(
        b"% Width " + b"1" + b"0" * 20 + b"\n% Height 10\n" + bytes([0x0C, 8]) + bytes(16)
    )
    cases.append(("dat width 10^20", "dat", folder / "wide.dat", r"at byte offset 0: header 'width' gives a 10{20}x10"))
    (folder / "noise.raw").write_bytes(np.random.default_rng(0).bytes(10_000))
    cases.append(("raw 10 KB noise", "raw", folder / "noise.raw", r"at byte offset 0: expected a '%' text header"))
    (folder / "noversion.raw").write_bytes(b"% date 2024-01-01\n" + np.random.default_rng(1).bytes(4000))
    cases.append(("raw without evt", "raw", folder / "noversion.raw", r"offset 18: the '%' header has no 'evt"))
    return cases


# --- running the corpus -----------------------------------------------------------------------------------------


def _run_corpus(cases: list[dict], folder: Path) -> dict[int, dict]:
    """Read every case in capped child processes; a child that dies is restarted after the case it died on."""
    results: dict[int, dict] = {}
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "BLOSC_NTHREADS": "1", "RUST_BACKTRACE": "0"}
    pending = list(cases)
    while pending:
        listing = folder / "cases.jsonl"
        listing.write_text("".join(json.dumps(case) + "\n" for case in pending))
        budget = CASE_TIME_BOUND_S * len(pending) + 30
        run = subprocess.run(
            [sys.executable, "-c", WORKER, str(listing), str(MEMORY_BOUND)],
            capture_output=True,
            text=True,
            env=env,
            timeout=budget,
        )
        for line in run.stdout.splitlines():
            result = json.loads(line)
            results[result["id"]] = result
        done = {case["id"] for case in pending if case["id"] in results}
        if len(done) < len(pending):  # the child died: record the case it was reading, go on after it
            died = next(case for case in pending if case["id"] not in done)
            results[died["id"]] = {"id": died["id"], "outcome": "died", "message": run.stderr[-2000:], "seconds": 0}
        pending = [case for case in pending if case["id"] not in results]
    return results


def _summary(cases: list[dict], results: dict[int, dict]) -> str:
    by_format: dict[str, list[int]] = {}
    for case in cases:
        result = results[case["id"]]
        counts = by_format.setdefault(case["format"], [0, 0, 0, 0])
        counts[0] += 1
        counts[1] += result["outcome"] in ("read", "error")
        counts[2] += result["outcome"] == "error"
        counts[3] += result.get("offset", False)
    lines = [f"{'format':12s} {'cases':>6s} {'clean':>6s} {'errors':>6s} {'offset':>6s}"]
    lines += [f"{name:12s} {a:6d} {b:6d} {c:6d} {d:6d}" for name, (a, b, c, d) in sorted(by_format.items())]
    totals = np.sum(list(by_format.values()), axis=0)
    lines.append(f"{'total':12s} " + " ".join(f"{v:6d}" for v in totals))
    return "\n".join(lines)


def _failures(cases: list[dict], results: dict[int, dict]) -> list[str]:
    failures = []
    for case in cases:
        result = results[case["id"]]
        if result["outcome"] not in ("read", "error") or result["seconds"] > CASE_TIME_BOUND_S:
            failures.append(
                f"{case['name']} ({case['format']}): {result['outcome']} in {result['seconds']:.1f} s: "
                f"{result.get('message', '')}"
            )
        elif case.get("expect") and not (result["outcome"] == "error" and _matches(case["expect"], result["message"])):
            failures.append(f"{case['name']}: expected an error matching {case['expect']!r}, got {result}")
    return failures


def _matches(pattern: str, message: str) -> bool:
    return re.search(pattern, message) is not None


def _corpus(folder: Path, per_seed: int, aedat4_per_seed: int) -> list[dict]:
    """The seeds as they are, ``per_seed`` corruptions of each (fewer for AEDAT4, slow to open), the hostile files."""
    rng = np.random.default_rng(2025)
    cases = []
    for seed, fmt, path, inside in _seeds(folder / "seeds"):
        cases.append({"name": f"{seed}: valid", "format": fmt, "path": str(path)})
        blob = (path / inside).read_bytes()
        for label, corrupt in _mutations(blob, rng, aedat4_per_seed if fmt == "aedat4" else per_seed):
            copy = folder / "cases" / str(len(cases)) / path.name
            if inside:  # a copy of the DDD17 folder with one of its files corrupted
                shutil.copytree(path, copy)
            else:
                copy.parent.mkdir(parents=True)
            (copy / inside).write_bytes(corrupt)
            cases.append({"name": f"{seed}: {label}", "format": fmt, "path": str(copy)})
    for name, fmt, path, expect in _hostile(folder / "hostile"):
        cases.append({"name": name, "format": fmt, "path": str(path), "expect": expect})
    for number, case in enumerate(cases):
        case["id"] = number
    return cases


def _check_corpus(tmp_path, per_seed: int, aedat4_per_seed: int) -> None:
    cases = _corpus(tmp_path, per_seed, aedat4_per_seed)
    results = _run_corpus(cases, tmp_path)
    print(f"\n{len(cases)} cases:\n{_summary(cases, results)}")  # the counts, with `pytest -s`
    failures = _failures(cases, results)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:20])
    assert all(results[case["id"]]["outcome"] == "read" for case in cases if case["name"].endswith(": valid"))


def test_fuzz_corpus_gives_events_or_format_errors_within_memory_and_time(tmp_path):
    _check_corpus(tmp_path, per_seed=30, aedat4_per_seed=6)


@pytest.mark.slow
def test_fuzz_corpus_large(tmp_path):
    _check_corpus(tmp_path, per_seed=150, aedat4_per_seed=40)


# --- claimed sizes, one by one ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 10**7), min_size=1, max_size=3).map(tuple),
    stored=st.integers(0, 4000),
    method=st.sampled_from([None, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
)
def test_claimed_npy_shapes_are_read_only_when_the_bytes_hold_them(tmp_path_factory, shape, stored, method):
    """A .npy header (alone, or an npz member stored or deflated) claiming ``shape`` of int64 over ``stored`` bytes:
    read exactly when the bytes hold it, refused naming the claim otherwise, and never allocating the claim."""
    claimed = math.prod(shape) * 8  # exact: np.prod would wrap around int64 for the largest shapes
    blob = _npy_header(shape, "<i8") + bytes(stored)
    path = tmp_path_factory.mktemp("claim") / ("a.npy" if method is None else "a.npz")
    if method is None:
        path.write_bytes(blob)
    else:
        with zipfile.ZipFile(path, "w", method) as archive:
            archive.writestr("event_data.npy", blob)
    tracemalloc.start()
    try:
        if claimed <= stored:
            array = load_npy(path) if method is None else load_npz(path)["event_data"]
            assert array.shape == shape and not array.any()
        else:
            with pytest.raises(EventFormatError, match=rf"claims shape \({shape[0]},.* \({claimed} bytes\), but only"):
                load_npy(path) if method is None else load_npz(path)
        assert tracemalloc.get_traced_memory()[1] < 2 * stored + (1 << 20)
    finally:
        tracemalloc.stop()


def test_data_info_refuses_a_file_claiming_10_to_the_12_events(tmp_path, capsys):
    from evpretrain.cli import main

    cases = {name: (path, expect) for name, _, path, expect in _hostile(tmp_path / "hostile")}
    path, expect = cases["dsec 10^12 events"]
    assert main(["data", "info", str(path)]) == 2
    assert re.search(r"evpretrain: error: .*dsec_huge\.h5: HDF5 dataset " + expect, capsys.readouterr().err)


def test_a_npy_header_length_of_4_gb_is_refused_before_reading_it(tmp_path):
    """Version 2.0 headers give their length as uint32; numpy reads that many bytes before checking them."""
    path = tmp_path / "index.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{}")
    with pytest.raises(EventFormatError, match=r"index\.npy: at byte offset 0: .* a 4294967280-byte header, expected"):
        load_npy(path)
