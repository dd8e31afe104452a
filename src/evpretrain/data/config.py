"""The data builders' settings: the config sections ``data.demo``, ``data.ef``, ``data.convert.<dataset>`` and
``data.imports.<name>``, each a frozen dataclass that checks its fields (cross-field checks included) when built.

They live apart from the builders (``evpretrain.data.demo``, ``ef``, ``importer``, ``sequences.*``), which import
scipy, numba and h5py, so that the pipeline loads every data section its jobs will read while it plans the study
(``evpretrain.pipeline.validate.validate_data``) without importing any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from evpretrain.events.readers.ddd17 import SENSOR_SIZE as DDD17_SENSOR_SIZE
from evpretrain.events.readers.dsec import SENSOR_SIZE as DSEC_SENSOR_SIZE
from evpretrain.events.readers.mvsec import SENSOR_SIZE as MVSEC_SENSOR_SIZE
from evpretrain.events.readers.streaming import CHUNK_EVENTS
from evpretrain.events.simulator_config import SimulatorConfig
from evpretrain.events.windows import WindowSpec

__all__ = [
    "CONVERT_CONFIGS",
    "DemoConfig",
    "Ddd17ConvertConfig",
    "DsecSemanticSettings",
    "EFConfig",
    "ImportConfig",
    "MvsecConvertConfig",
    "StoreCompression",
]


@dataclass(frozen=True)
class StoreCompression:
    """HDF5 filters. ``events`` applies to the event columns, ``dense`` to frames, maps, flow and masks.

    Every training epoch pays the read side, and the filters make reads several times slower for a modest saving in
    size (bench/README.md, "Event store"), so nothing is compressed by default; turn them on for archives.
    """

    events: Literal["none", "gzip", "lzf"] = "none"
    dense: Literal["none", "gzip", "lzf"] = "none"
    gzip_level: int = 1
    # HDF5's fletcher32 checksum per chunk, checked on every read: flipped bits fail loudly instead of training
    # silently (read cost: bench/bench_store.py).
    checksum: bool = True

    def filters(self, which: str) -> dict[str, Any]:
        name = self.events if which == "events" else self.dense
        checksum = {"fletcher32": self.checksum}
        if name == "none":
            return checksum
        if name == "lzf":
            return {"compression": "lzf", "shuffle": True, **checksum}
        return {"compression": "gzip", "compression_opts": self.gzip_level, "shuffle": True, **checksum}


# build-demo (evpretrain.data.demo)
DEMO_SPLITS = ("train", "val", "test")
DEMO_BACKGROUNDS = ("brick", "grass", "gravel", "camera", "coins", "moon", "text")  # skimage.data textures


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``build-demo`` (config section ``data.demo``). Lengths in pixels, rates per frame."""

    seed: int = 0
    image_size: int = 64
    digit_size: int = 28
    num_frames: int = 8
    frame_rate_hz: float = 120.0
    samples: dict[str, int] = field(default_factory=lambda: {"train": 600, "val": 150, "test": 150})
    background: str = "brick"
    background_intensity: tuple[float, float] = (0.05, 0.5)
    digit_intensity: float = 0.95
    pan_speed_px_per_frame: tuple[float, float] = (0.5, 1.5)
    digit_drift_px_per_frame: float = 0.6
    digit_jitter_px: float | None = None
    saccade_legs: int = 1
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    compression: StoreCompression = field(default_factory=StoreCompression)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 < self.frame_rate_hz <= 1e6:  # frames at least a microsecond apart
            raise ValueError(f"frame_rate_hz must lie in (0, 1e6], got {self.frame_rate_hz}")
        low, high = self.background_intensity
        if not 0 <= low <= high <= 1:
            raise ValueError(f"background_intensity must be [low, high] with 0 <= low <= high <= 1, got {[low, high]}")
        if not 0 <= self.digit_intensity <= 1:
            raise ValueError(f"digit_intensity must lie in [0, 1], got {self.digit_intensity}")
        if self.digit_drift_px_per_frame < 0:
            raise ValueError(f"digit_drift_px_per_frame must be >= 0, got {self.digit_drift_px_per_frame}")
        if self.background not in DEMO_BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {DEMO_BACKGROUNDS}")
        if set(self.samples) - set(DEMO_SPLITS):
            raise ValueError(
                f"samples: unknown split(s) {sorted(set(self.samples) - set(DEMO_SPLITS))}, expected {DEMO_SPLITS}"
            )
        if any(n < 0 for n in self.samples.values()):
            raise ValueError("samples: counts must be >= 0")
        if not 8 <= self.digit_size <= self.image_size // 2 + 8:
            raise ValueError(f"digit_size {self.digit_size} must lie in [8, image_size / 2 + 8]")
        if self.digit_jitter_px is not None and self.digit_jitter_px < 0:
            raise ValueError(
                f"digit_jitter_px must be >= 0 (or null: anywhere in the frame), got {self.digit_jitter_px}"
            )
        if self.num_frames < 2:
            raise ValueError("num_frames must be >= 2")
        if not 1 <= self.saccade_legs <= min(3, self.num_frames - 1):
            raise ValueError(f"saccade_legs must lie in [1, min(3, num_frames - 1)], got {self.saccade_legs}")
        low, high = self.pan_speed_px_per_frame
        if not 0 <= low <= high:
            raise ValueError("pan_speed_px_per_frame must be [low, high] with 0 <= low <= high")
        travel = (high + self.digit_drift_px_per_frame) * (self.num_frames - 1)
        if self.digit_size + 2 * travel + 2 > self.image_size:
            raise ValueError(
                f"the digit ({self.digit_size} px) travelling up to {travel:.1f} px does not fit in "
                f"{self.image_size} px"
            )


@dataclass(frozen=True)
class EFConfig:
    """Settings of ``build-ef`` (config section ``data.ef``). Lengths in output pixels, speeds per frame."""

    seed: int = 0
    image_size: int = 224
    num_frames: int = 6
    frame_rate_hz: float = 30.0
    pan_speed_px_per_frame: tuple[float, float] = (1.0, 4.0)
    zoom_per_frame: float = 0.01  # largest relative scale change between consecutive frames
    shard_size: int = 256
    shards: int = 1  # parts (cluster jobs) the pipeline splits the build into; not part of the content
    keep_frames: bool = False
    keep_rgb: bool = False  # the colour source, CLIP's resize and centre crop to rgb_size: (3, S, S) uint8 /rgb
    rgb_size: int = 224
    keep_clean_events: bool = False
    dense_dtype: Literal["float16", "float32"] = "float16"
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    compression: StoreCompression = field(default_factory=StoreCompression)

    def __post_init__(self) -> None:
        if min(self.image_size - 15, self.num_frames - 1, self.shard_size, self.shards, self.rgb_size) < 1:
            raise ValueError("image_size must be >= 16, num_frames >= 2, shard_size, shards and rgb_size >= 1")
        if not 0 <= self.pan_speed_px_per_frame[0] <= self.pan_speed_px_per_frame[1]:
            raise ValueError("pan_speed_px_per_frame must be [low, high] with 0 <= low <= high")


# data import (evpretrain.data.importer)
DEFAULT_IMPORT_SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass(frozen=True)
class ImportConfig:
    """Settings of an import (CLI ``evpretrain data import``; config ``data.imports.<name>``).

    ``root``: the folder of recordings; ``layout``: ``class_folders`` or ``recordings`` (``evpretrain.data.importer``).
    ``window``: ``events:N``, ``ms:T`` (milliseconds) or ``frames:K`` (K + 1 intensity frames of an AEDAT4 file and
    the events between; the store keeps frames and diff_maps), or None (one sample a file; ``class_folders`` only).
    ``split``: split name -> fraction of the recordings (summing to 1), drawn with ``seed``; or ``split_map``, a
    YAML/JSON file of ``{path relative to root: split}``. ``format``: a reader name (``evpretrain data formats``),
    None to detect it per file. ``sensor_size`` (H, W): for files whose header gives none (a file that gives
    another size is refused). ``skip_bad``: leave out unreadable files, and files too short for one window, with a
    warning, instead of stopping. ``chunk_events``: events read at a time.
    """

    root: str
    layout: Literal["class_folders", "recordings"]
    window: str | None = None
    split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_IMPORT_SPLIT))
    seed: int = 0
    split_map: str | None = None
    format: str | None = None
    sensor_size: tuple[int, int] | None = None
    skip_bad: bool = False
    chunk_events: int = CHUNK_EVENTS

    def __post_init__(self) -> None:
        if self.window is not None:
            WindowSpec.parse(self.window)  # raises ValueError naming what is expected
        elif self.layout == "recordings":
            raise ValueError(
                "layout recordings cuts each recording into windows: set window (events:N, ms:T or frames:K)"
            )
        if not self.split:
            raise ValueError("split: expected at least one split, e.g. {train: 0.8, val: 0.1, test: 0.1}")
        if any(not name or name.startswith(".") or "/" in name for name in self.split):
            raise ValueError(f"split: names become file names ({{split}}.h5), got {list(self.split)}")
        if any(not fraction > 0 for fraction in self.split.values()) or abs(sum(self.split.values()) - 1) > 1e-6:
            raise ValueError(f"split: expected positive fractions summing to 1, got {self.split}")
        if self.sensor_size is not None and min(self.sensor_size) < 1:
            raise ValueError(f"sensor_size: expected (height, width) >= 1, got {self.sensor_size}")
        if self.chunk_events < 1:
            raise ValueError(f"chunk_events must be >= 1, got {self.chunk_events}")

    @property
    def window_spec(self) -> WindowSpec | None:
        return None if self.window is None else WindowSpec.parse(self.window)


# The sequence converters (evpretrain.data.sequences.<dataset>)
DDD17_LABEL_SIZE = (200, DDD17_SENSOR_SIZE[1])  # (H, W) of every EV-SegNet mask: the sensor's top 200 rows


@dataclass(frozen=True)
class Ddd17ConvertConfig:
    """Settings of the DDD17 converter (config section ``data.convert.ddd17``).

    ``num_events``: events a ``count`` window keeps (inside the crop). 80,000 is the paper's DDD17 value
    (EventPretrain ``main_finetune_semseg.py``: ``--fix_events_num ... # ddd17:80000``); ESS
    (``config/settings_DDD17.yaml``) feeds 20 x 32,000 = 640,000 events, counted before its crop.
    ``duration_ms``: which index file a ``duration`` window takes (10, 50 or 250 ms, as ESS ships them).
    ``splits``: output split -> sequence folders.
    """

    window: Literal["count", "duration"] = "count"
    num_events: int = 80_000
    duration_ms: Literal[10, 50, 250] = 50
    splits: dict[str, list[str]] = field(
        default_factory=lambda: {"train": ["dir0", "dir3", "dir4", "dir6", "dir7"], "test": ["dir1"]}
    )
    compression: StoreCompression = field(default_factory=StoreCompression)

    def __post_init__(self) -> None:
        if self.num_events < 1:
            raise ValueError(f"num_events must be >= 1, got {self.num_events}")
        if not self.splits or any(not dirs for dirs in self.splits.values()):
            raise ValueError(f"splits must map each split to at least one sequence folder, got {self.splits}")
        folders = [d for dirs in self.splits.values() for d in dirs]
        repeated = sorted({d for d in folders if folders.count(d) > 1})
        if repeated:
            raise ValueError(f"sequence folder(s) {repeated} appear more than once in splits")

    @property
    def index_ms(self) -> int:
        """Which ``index/index_<ms>ms.npy`` defines the windows: ``event_index`` is the same column in all three,
        so a ``count`` window reads the 50 ms file, as ESS does by default."""
        return self.duration_ms if self.window == "duration" else 50

    @property
    def index_file(self) -> str:
        return f"index_{self.index_ms}ms.npy"

    def describe_window(self) -> str:
        crop = f"y < {DDD17_LABEL_SIZE[0]}"
        if self.window == "count":
            what = f"the last {self.num_events} events with {crop} before the label's frame"
        else:
            what = f"the events with {crop} in the {self.duration_ms} ms before the label's frame"
        return (
            f"{what}: rows [{'0' if self.window == 'count' else 'event_index_before'}, event_index) of events.dat.* "
            f"by index/{self.index_file}; t in microseconds, as recorded"
        )


# ESS's provider.py (and the paper's FinetuneDSECDataset): the sequences DSEC-Semantic labels.
DSEC_TRAIN_SEQUENCES = (
    "zurich_city_00_a",
    "zurich_city_01_a",
    "zurich_city_02_a",
    "zurich_city_04_a",
    "zurich_city_05_a",
    "zurich_city_06_a",
    "zurich_city_07_a",
    "zurich_city_08_a",
)
DSEC_TEST_SEQUENCES = ("zurich_city_13_a", "zurich_city_14_c", "zurich_city_15_a")


@dataclass(frozen=True)
class DsecSemanticSettings:
    """Settings of the converter (config section ``data.convert.dsec-semantic``); times in microseconds.

    ``window``: ``"events"`` keeps the last ``num_events`` events before the label, ``"time"`` the events of the
    ``window_us`` before it. ``rectify``: map events through rectify_map.h5 (the labels live in the rectified frame;
    off only for ablations). ``rounding``: rectified position -> pixel, ``"floor"`` (the paper) or ``"nearest"``.
    ``crop_height``: rows kept from the top, events and labels. ``sequences``: split folder -> sequence names.
    """

    window: Literal["events", "time"] = "events"
    num_events: int = 200_000  # the paper: --fix_events_num and --val_fix_events_num
    window_us: int = 50_000  # ESS: delta_t_per_data = 50 ms, nr_events_data = 1 (datasets/DSEC_events_loader.py)
    skip_first_labels: int = 6  # ESS: (remove_time_window // 100 + 1) * 2 with remove_time_window = 250
    label_stride: int = 2  # ESS and the paper: label 2 * index
    rectify: bool = True
    rounding: Literal["floor", "nearest"] = "floor"
    crop_height: int = 440  # ESS: event_tensor[:, :-40, :]; the paper: dsec_sensor_h = 440
    sequences: dict[str, list[str]] = field(
        default_factory=lambda: {"train": list(DSEC_TRAIN_SEQUENCES), "test": list(DSEC_TEST_SEQUENCES)}
    )
    compression: StoreCompression = field(default_factory=StoreCompression)

    def __post_init__(self) -> None:
        if self.num_events < 1 or self.window_us < 1:
            raise ValueError(f"num_events ({self.num_events}) and window_us ({self.window_us}) must be >= 1")
        if self.skip_first_labels < 0 or self.label_stride < 1:
            raise ValueError("skip_first_labels must be >= 0 and label_stride >= 1")
        if not 1 <= self.crop_height <= DSEC_SENSOR_SIZE[0]:
            raise ValueError(f"crop_height {self.crop_height} must lie in [1, {DSEC_SENSOR_SIZE[0]}]")
        if not self.sequences or not all(self.sequences.values()):
            raise ValueError("sequences must map at least one split folder to a non-empty list of sequence names")

    @property
    def sensor_size(self) -> tuple[int, int]:
        """(height, width) the events and masks share after the crop."""
        return self.crop_height, DSEC_SENSOR_SIZE[1]


# The paper's ``Valid_Time_Index``: frames [first, stop) of the left grayscale camera that windows may use.
MVSEC_FRAME_RANGES = {
    "indoor_flying1": (314, 2199),
    "indoor_flying2": (314, 2199),
    "indoor_flying3": (314, 2199),
    "outdoor_day1": (245, 3000),
    "outdoor_day2": (4375, 7002),
}
# EV-FlowNet's ``extract_all_bags.sh``: seconds skipped at the start of each recording (take-off, start-up).
MVSEC_START_OFFSETS_S = {
    "indoor_flying1": 4.0,
    "indoor_flying2": 9.0,
    "indoor_flying3": 7.0,
    "outdoor_day1": 3.0,
    "outdoor_day2": 45.0,
}


@dataclass(frozen=True)
class MvsecConvertConfig:
    """Settings of the MVSEC converter (config section ``data.convert.mvsec``); defaults are the paper's protocol.

    ``frame_ranges``: per sequence, frames [first, stop) whose windows are kept (sequences not listed: all).
    ``start_offsets_s``: per sequence, windows starting earlier than this many seconds after the recording's first
    event or frame are dropped (EV-FlowNet's values; the paper's frame ranges should start later, so they ought to
    drop nothing: the store attribute ``window_counts`` says how many each rule dropped).
    ``train_share``: per test sequence, the fraction of its windows moved to train (``int(fraction * n)`` windows),
    picked at random with ``seed`` through Python's ``random.sample`` (the paper's code) or the ``"first"`` ones.
    ``outdoor_max_row``: image rows >= it are invalid in ``outdoor_*`` sequences (EV-FlowNet: 190); None keeps all.
    ``windows_per_task``: windows a worker process cuts at a time.
    """

    train_sequences: tuple[str, ...] = ("outdoor_day1", "outdoor_day2")
    test_sequences: tuple[str, ...] = ("indoor_flying1", "indoor_flying2", "indoor_flying3")
    frame_skip: int = 1
    frame_ranges: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(MVSEC_FRAME_RANGES))
    start_offsets_s: dict[str, float] = field(default_factory=lambda: dict(MVSEC_START_OFFSETS_S))
    train_share: dict[str, float] = field(default_factory=lambda: {"indoor_flying1": 0.01})
    train_share_pick: Literal["random", "first"] = "random"
    seed: int = 0
    outdoor_max_row: int | None = None
    max_flow_px: float = 1000.0
    windows_per_task: int = 32
    compression: StoreCompression = field(default_factory=StoreCompression)

    def __post_init__(self) -> None:
        if self.frame_skip < 1:
            raise ValueError(f"frame_skip must be >= 1, got {self.frame_skip}")
        both = sorted(set(self.train_sequences) & set(self.test_sequences))
        if both:
            raise ValueError(f"sequence(s) {both} are in both train_sequences and test_sequences")
        for name, (first, stop) in self.frame_ranges.items():
            if not 0 <= first < stop:
                raise ValueError(
                    f"frame_ranges.{name}: expected [first, stop) with 0 <= first < stop, got {[first, stop]}"
                )
        if any(offset < 0 for offset in self.start_offsets_s.values()):
            raise ValueError("start_offsets_s: offsets must be >= 0 seconds")
        for name, fraction in self.train_share.items():
            if name not in self.test_sequences:
                raise ValueError(f"train_share.{name}: only a test sequence can lend windows to train")
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"train_share.{name}: expected a fraction in [0, 1], got {fraction}")
        if self.outdoor_max_row is not None and not 0 < self.outdoor_max_row <= MVSEC_SENSOR_SIZE[0]:
            raise ValueError(f"outdoor_max_row must lie in [1, {MVSEC_SENSOR_SIZE[0]}], got {self.outdoor_max_row}")
        if self.max_flow_px <= 0:
            raise ValueError(f"max_flow_px must be > 0, got {self.max_flow_px}")
        if self.windows_per_task < 1:
            raise ValueError(f"windows_per_task must be >= 1, got {self.windows_per_task}")


# data.convert.<dataset>: the settings of each registered window converter (data.registry.SEQUENCE_CONVERTERS)
CONVERT_CONFIGS: dict[str, type] = {
    "ddd17": Ddd17ConvertConfig,
    "dsec-semantic": DsecSemanticSettings,
    "mvsec": MvsecConvertConfig,
}
