"""MVSEC optical flow (Zhu et al., 2018) -> event windows with ground-truth flow, as the paper's code cuts them.

Input, per sequence ``<seq>`` (indoor_flying1-3, outdoor_day1-2) in the dataset root:
- ``<seq>_data.hdf5``: ``davis/left/events`` (N, 4) float64 rows (x, y, t seconds, p) and
  ``davis/left/image_raw_ts`` (F,) float64 seconds, the grayscale frame times;
- ``<seq>_gt.hdf5``: ``davis/left/flow_dist`` (G, 2, 260, 346) and ``davis/left/flow_dist_ts`` (G,) seconds.
  ``flow_dist[k]`` is the (dx, dy) pixel displacement from ``flow_dist_ts[k]`` to ``flow_dist_ts[k + 1]``
  (EV-FlowNet's reading, ``estimate_corresponding_gt_flow``), sampled at about 20 Hz, not at the frame times.

Protocol (sources: BIT-Vision/EventPretrain ``dataset/finetune_flow/ft_mvsec_dataset.py`` and
``trainer/finetune_flow/ft_flow_trainer.py``, the paper's code; daniilidis-group/EV-FlowNet ``src/eval_utils.py``,
``src/test.py`` and ``data/extract_all_bags.sh``):
- A window joins grayscale frames i and i + dt (dt = ``frame_skip`` = 1): the events with
  ``image_raw_ts[i] <= t < image_raw_ts[i + dt]`` of the left DAVIS. (The paper slices the events by
  ``image_raw_event_inds``, MVSEC's index of the event at each frame time: the same cut, up to ties.)
- Its ground truth is the gt displacement over the same interval: each gt interval the window overlaps is scaled
  by the fraction it overlaps, and successive pieces are chained by moving every pixel along them, the flow of the
  next piece read at the pixel's rounded (nearest) position, as ``gen_correspond_gt_flow``/``prop_flow`` do with
  ``cv2.remap(INTER_NEAREST)``. A window inside one gt interval is that interval's flow scaled by its share.
  (EV-FlowNet itself scales the first interval whenever the window is shorter than a gt interval, even when it
  straddles two; the paper's code, followed here, chains the two pieces.)
- ``valid`` marks pixels whose ground truth is defined, as the paper's code: every gt vector read along the path is
  finite and non-zero (MVSEC writes zeros where depth is unknown), the path stays inside the image, and the
  result is non-zero with |dx|, |dy| < ``max_flow_px`` (1000). Invalid pixels hold flow 0. ``valid`` alone does
  not look at the events: the paper scores only valid pixels that also have events in the window (its
  ``sparse_mask``, ``ft_flow_trainer.py:198-203``), a mask the downstream dataset computes from each sample's events
  (``evpretrain.downstream.data``, ``events``) and the flow metrics apply (``downstream.metrics.FlowMetrics``).
- No crop: events and flow keep the full 260 x 346 frame, as in the paper's code (which resizes to 224 x 224 in
  the model and the flow back). EV-FlowNet instead evaluates a central 256 x 256 crop and, on outdoor sequences,
  only the top 190 rows (the car's hood fills the rest): ``outdoor_max_row = 190`` marks those rows invalid.
- Frames: only windows with both frames in ``frame_ranges[seq] = [first, stop)`` (the paper's
  ``Valid_Time_Index``), and, as EV-FlowNet extracts its data, starting at least ``start_offsets_s[seq]`` seconds
  after the recording starts (first event or frame), and covered by the gt timestamps.
- Split (the paper's): train = outdoor_day1 + outdoor_day2 + 1% of the indoor_flying1 windows, drawn as the
  paper's code draws them (``random.seed(0); random.sample(windows, int(0.01 * len(windows)))`` over the windows
  of the frame range); test = the other indoor_flying1 windows, indoor_flying2 and indoor_flying3.

Each sample is named ``<sequence>/<first frame index, 5 digits>``, so results can be reported per sequence.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evpretrain.config import from_mapping, to_mapping
from evpretrain.data.config import MvsecConvertConfig
from evpretrain.data.store import EventStoreWriter
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers._io import h5_dataset, h5_read, open_h5
from evpretrain.events.readers.mvsec import SENSOR_SIZE, MvsecEvents
from evpretrain.workers import worker_pool

SPLITS = ("train", "test")
IMAGE_TS_KEY = "davis/left/image_raw_ts"
FLOW_KEY = "davis/left/flow_dist"
FLOW_TS_KEY = "davis/left/flow_dist_ts"


@dataclass(frozen=True)
class Window:
    """One sample: events ``event_rows`` of the data file, gt flow chained over ``gt_pieces``.

    ``gt_pieces``: (gt index k, fraction of the interval [ts[k], ts[k + 1]] the window covers), in time order.
    """

    sequence: str
    frame: int
    t_start_us: int
    t_end_us: int
    event_rows: tuple[int, int]
    gt_pieces: tuple[tuple[int, float], ...]

    @property
    def name(self) -> str:
        return f"{self.sequence}/{self.frame:05d}"


@dataclass(frozen=True)
class SequencePlan:
    """The windows of one sequence per split, and how many the frame range held and each rule dropped."""

    sequence: str
    windows: dict[str, list[Window]]
    counts: dict[str, int]


def gt_pieces(gt_ts_us: np.ndarray, t_start_us: int, t_end_us: int) -> tuple[tuple[int, float], ...]:
    """The gt intervals [ts[k], ts[k + 1]] that [t_start, t_end] overlaps, with the fraction of each it covers.

    Requires ``gt_ts_us[0] <= t_start_us < t_end_us <= gt_ts_us[-1]`` (strictly increasing ``gt_ts_us``). The
    fractions weight the intervals' displacements: sum(fraction_k * (ts[k + 1] - ts[k])) = t_end - t_start.
    """
    if not gt_ts_us[0] <= t_start_us < t_end_us <= gt_ts_us[-1]:
        raise ValueError(
            f"window [{t_start_us}, {t_end_us}] us is not inside the gt span [{gt_ts_us[0]}, {gt_ts_us[-1]}]"
        )
    first = int(np.searchsorted(gt_ts_us, t_start_us, side="right")) - 1
    last = int(np.searchsorted(gt_ts_us, t_end_us, side="left")) - 1
    pieces = []
    for k in range(first, last + 1):
        low, high = max(t_start_us, int(gt_ts_us[k])), min(t_end_us, int(gt_ts_us[k + 1]))
        pieces.append((k, (high - low) / float(gt_ts_us[k + 1] - gt_ts_us[k])))
    return tuple(pieces)


def chain_flow(
    fields: Sequence[np.ndarray], fractions: Sequence[float], *, max_flow_px: float = 1000.0
) -> tuple[np.ndarray, np.ndarray]:
    """Chain displacement fields, each scaled by its fraction, from every pixel; return (flow, valid).

    ``fields``: (2, H, W) (dx, dy) pixel displacements, in time order. Each pixel moves by ``fraction * field`` read
    at its current position rounded to the nearest pixel (halves to even, as OpenCV's ``cvRound``). ``flow`` is
    (2, H, W) float32, the end position minus the start position; ``valid`` (H, W) bool is True where every vector
    read was finite and non-zero inside the image and the result is non-zero with |dx|, |dy| < ``max_flow_px``.
    Invalid pixels hold 0.
    """
    height, width = fields[0].shape[1:]
    start_y, start_x = np.mgrid[0:height, 0:width]
    # The first field is read where every pixel starts (integer positions), the others where it has moved to.
    dx, dy = fields[0][0].astype(np.float64), fields[0][1].astype(np.float64)
    valid = _defined(dx, dy)
    x = start_x + np.where(valid, dx * fractions[0], 0.0)
    y = start_y + np.where(valid, dy * fractions[0], 0.0)
    for gt, fraction in zip(fields[1:], fractions[1:], strict=True):
        column, row = np.rint(x), np.rint(y)
        inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
        column = np.where(inside, column, 0).astype(np.intp)
        row = np.where(inside, row, 0).astype(np.intp)
        dx, dy = gt[0][row, column].astype(np.float64), gt[1][row, column].astype(np.float64)
        defined = inside & _defined(dx, dy)
        valid &= defined
        x += np.where(defined, dx * fraction, 0.0)
        y += np.where(defined, dy * fraction, 0.0)
    flow = np.stack([x - start_x, y - start_y])
    valid &= np.any(flow != 0, axis=0) & np.all(np.abs(flow) < max_flow_px, axis=0)
    flow[:, ~valid] = 0.0
    return flow.astype(np.float32), valid


def _defined(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where a gt vector exists: finite and not (0, 0), MVSEC's value where depth is unknown."""
    return np.isfinite(dx) & np.isfinite(dy) & ((dx != 0) | (dy != 0))


def pick_train_share(frames: np.ndarray, fraction: float, *, pick: str, seed: int) -> np.ndarray:
    """Boolean mask over ``frames`` (window start frames, ascending) of the ``int(fraction * n)`` moved to train.

    ``"random"`` draws them as the paper's code: ``random.seed(seed); random.sample(list(frames), k)``.
    """
    count = int(fraction * len(frames))
    if pick == "first":
        chosen = frames[:count]
    else:
        chosen = random.Random(seed).sample([int(f) for f in frames], count)
    return np.isin(frames, np.asarray(chosen, dtype=frames.dtype))


def plan_sequence(
    data_path: Path, gt_path: Path, sequence: str, split: str, config: MvsecConvertConfig
) -> SequencePlan:
    """Every window of one sequence, assigned to splits (``split`` is the sequence's own)."""
    with open_h5(data_path) as file:
        image_ts = _increasing_times_us(file, IMAGE_TS_KEY, source=data_path)
    with open_h5(gt_path) as file:
        gt_ts = _increasing_times_us(file, FLOW_TS_KEY, source=gt_path)
        flows = h5_dataset(file, FLOW_KEY, source=gt_path)
        if flows.shape != (len(gt_ts), 2, *SENSOR_SIZE) or not np.issubdtype(flows.dtype, np.floating):
            raise EventFormatError(
                gt_path,
                f"'{FLOW_KEY}' is {flows.dtype} {flows.shape}, expected floats of shape "
                f"({len(gt_ts)}, 2, {SENSOR_SIZE[0]}, {SENSOR_SIZE[1]}), one (dx, dy) map per '{FLOW_TS_KEY}' entry",
            )
    dt = config.frame_skip
    first, stop = config.frame_ranges.get(sequence, (0, len(image_ts)))
    stop = min(stop, len(image_ts))
    frames = np.arange(first, max(first, stop - dt), dtype=np.int64)  # both frames i and i + dt in [first, stop)
    moved = np.zeros(len(frames), dtype=bool)
    if sequence in config.train_share:
        moved = pick_train_share(frames, config.train_share[sequence], pick=config.train_share_pick, seed=config.seed)
    t_start, t_end = image_ts[frames], image_ts[frames + dt]

    with MvsecEvents(data_path) as events:
        origin = int(np.min(np.r_[image_ts[:1], events.rows(0, 1)["t"]]))  # the recording's start: first frame or event
        late_enough = t_start - origin >= round(config.start_offsets_s.get(sequence, 0.0) * 1e6)
        covered = (t_start >= gt_ts[0]) & (t_end <= gt_ts[-1])
        keep = late_enough & covered
        bounds = events.index_at(np.concatenate([t_start[keep], t_end[keep]]))
    starts, stops = np.split(bounds, 2)

    windows: dict[str, list[Window]] = {s: [] for s in SPLITS}
    for j, i in enumerate(np.flatnonzero(keep)):
        window = Window(
            sequence=sequence,
            frame=int(frames[i]),
            t_start_us=int(t_start[i]),
            t_end_us=int(t_end[i]),
            event_rows=(int(starts[j]), int(stops[j])),
            gt_pieces=gt_pieces(gt_ts, int(t_start[i]), int(t_end[i])),
        )
        windows["train" if moved[i] else split].append(window)
    counts = {
        "in_frame_range": len(frames),
        "dropped_before_start_offset": int(np.sum(~late_enough)),
        "dropped_outside_gt": int(np.sum(late_enough & ~covered)),
        **{s: len(w) for s, w in windows.items()},
    }
    return SequencePlan(sequence, windows, counts)


@dataclass(frozen=True)
class _Task:
    data_path: Path
    gt_path: Path
    windows: tuple[Window, ...]
    max_flow_px: float
    max_row: int | None


def cut_windows(task: _Task) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, events, flow (2, H, W) float32, valid (H, W) uint8) for each window of ``task``, in order."""
    samples = []
    fields: dict[int, np.ndarray] = {}
    with MvsecEvents(task.data_path) as events, open_h5(task.gt_path) as file:
        flows = h5_dataset(file, FLOW_KEY, source=task.gt_path)
        for window in task.windows:
            needed = [k for k, _ in window.gt_pieces]
            fields = {k: v for k, v in fields.items() if k >= needed[0]}  # windows run forward in time
            for k in needed:
                if k not in fields:
                    fields[k] = h5_read(flows, k, source=task.gt_path)
            flow, valid = chain_flow(
                [fields[k] for k in needed], [f for _, f in window.gt_pieces], max_flow_px=task.max_flow_px
            )
            if task.max_row is not None:
                valid[task.max_row :] = False
                flow[:, ~valid] = 0.0
            samples.append((window.name, events.rows(*window.event_rows), flow, valid.astype(np.uint8)))
    return samples


def convert(
    root: Path,
    out: Path,
    settings: Mapping[str, Any] | None,
    *,
    workers: int,
    progress: bool,
) -> list[Path]:
    """Cut a local MVSEC copy into ``out/train.h5`` and ``out/test.h5`` (module docstring); return their paths."""
    from tqdm import tqdm

    config = from_mapping(MvsecConvertConfig, settings, "data.convert.mvsec")
    root, out = Path(root), Path(out)
    sequences = {s: "train" for s in config.train_sequences} | {s: "test" for s in config.test_sequences}
    files = _sequence_files(root, sequences)
    plans = [plan_sequence(*files[s], s, split, config) for s, split in sequences.items()]

    written = []
    with worker_pool(workers) if workers > 1 else nullcontext() as pool:
        for split in SPLITS:
            tasks = [
                _Task(*files[plan.sequence], tuple(chunk), config.max_flow_px, _max_row(plan.sequence, config))
                for plan in plans
                for chunk in _chunks(plan.windows[split], config.windows_per_task)
            ]
            path = out / f"{split}.h5"
            with EventStoreWriter(
                path,
                sensor_size=SENSOR_SIZE,
                source=f"MVSEC (Zhu et al., 2018), left DAVIS; converted from {root.resolve()}",
                builder_config={"dataset": "mvsec", "split": split, **to_mapping(config)},
                attrs=_store_attrs(split, plans, files, root),
                compression=config.compression,
            ) as writer:
                total = sum(len(t.windows) for t in tasks)
                with tqdm(total=total, desc=f"mvsec/{split}", disable=not progress) as bar:
                    for samples in _ordered_map(pool, cut_windows, tasks, ahead=2 * max(1, workers)):
                        for name, events, flow, valid in samples:
                            writer.add_sample(events, name=name, flow=flow, valid=valid)
                        bar.update(len(samples))
            written.append(path)
    return written


def _store_attrs(
    split: str, plans: list[SequencePlan], files: dict[str, tuple[Path, Path]], root: Path
) -> dict[str, Any]:
    return {
        "dataset": "mvsec",
        "task": "flow",
        "split": split,
        "sequences": [p.sequence for p in plans if p.windows[split]],
        "windows_per_sequence": {p.sequence: len(p.windows[split]) for p in plans if p.windows[split]},
        "window_counts": {p.sequence: p.counts for p in plans},
        "window": "events of the left DAVIS with image_raw_ts[i] <= t < image_raw_ts[i + frame_skip]; "
        "sample name <sequence>/<i, 5 digits>",
        "flow": "(dx, dy) pixels over the window, at the pixel positions of its first frame, float32 (2, H, W)",
        "valid": "1 where the ground truth is defined (gt non-zero and finite along the path, inside the image, "
        "non-zero and below max_flow_px); flow is 0 where valid is 0",
        "source_files": sorted(str(p.relative_to(root)) for pair in files.values() for p in pair),
    }


def _sequence_files(root: Path, sequences: Iterable[str]) -> dict[str, tuple[Path, Path]]:
    """(data, gt) paths per sequence; raise naming every missing file."""
    files = {s: (root / f"{s}_data.hdf5", root / f"{s}_gt.hdf5") for s in sequences}
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"MVSEC file(s) missing: {', '.join(missing)}; expected <sequence>_data.hdf5 (events, frame times) and "
            "<sequence>_gt.hdf5 (davis/left/flow_dist) for every sequence of the split"
        )
    return files


def _increasing_times_us(file, key: str, *, source: Path) -> np.ndarray:
    """The 1-D seconds dataset ``key`` of an open file as int64 microseconds; raise unless strictly increasing."""
    seconds = h5_read(h5_dataset(file, key, source=source), source=source)
    numeric = np.issubdtype(seconds.dtype, np.number) and seconds.ndim == 1 and len(seconds) >= 2
    if not numeric or not np.all(np.isfinite(seconds)):
        raise EventFormatError(
            source, f"'{key}' is {seconds.dtype} {seconds.shape}, expected two or more finite times in seconds"
        )
    micros = np.rint(seconds.astype(np.float64) * 1e6).astype(np.int64)
    steps = np.flatnonzero(np.diff(micros) <= 0)
    if steps.size:
        i = int(steps[0])
        raise EventFormatError(
            source,
            f"'{key}'[{i + 1}] = {seconds[i + 1]} s does not follow [{i}] = {seconds[i]} s; expected increasing times",
        )
    return micros


def _max_row(sequence: str, config: MvsecConvertConfig) -> int | None:
    return config.outdoor_max_row if sequence.startswith("outdoor_") else None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ordered_map(pool: Executor | None, function: Callable, tasks: list, *, ahead: int) -> Iterator:
    """``map`` in task order with at most ``ahead`` tasks in flight, so finished windows never pile up in memory.

    ``pool`` None runs the tasks in this process.
    """
    if pool is None:
        yield from map(function, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(function, task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
