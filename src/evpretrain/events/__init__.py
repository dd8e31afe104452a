"""The data layer's stable face: read events, turn them into tensors, simulate them from frames.

Names load lazily so that ``import evpretrain.events.contract`` stays cheap (no numba, no torch).
"""

from evpretrain.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "EVENT_DTYPE": "contract",
        "EventFormatError": "contract",
        "Recording": "contract",
        "make_events": "contract",
        "validate_events": "contract",
        "read_events": "readers",
        "read_recording": "readers",
        "voxel_grid": "representations",
        "voxel_grid_many": "representations",
        "voxel_grid_batch": "representations",
        "EventTensors": "representations",
        "histogram_ecdp": "representations",
        "histogram_mem": "representations",
        "simulate": "simulator",
        "SimulatorConfig": "simulator_config",
        "SimulationResult": "simulator",
    },
)
