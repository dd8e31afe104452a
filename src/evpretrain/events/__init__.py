"""The data layer's stable face: read events, turn them into tensors, simulate them from frames.

Names load lazily so that ``import evpretrain.events.contract`` stays cheap (no numba, no torch).
"""

from importlib import import_module

_EXPORTS = {
    "EVENT_DTYPE": "contract",
    "EventFormatError": "contract",
    "Recording": "contract",
    "make_events": "contract",
    "validate_events": "contract",
    "read_events": "readers",
    "read_recording": "readers",
    "voxel_grid": "representations",
    "voxel_grid_batch": "representations",
    "EventTensors": "representations",
    "histogram_ecdp": "representations",
    "histogram_mem": "representations",
    "simulate": "simulator",
    "SimulatorConfig": "simulator_config",
    "SimulationResult": "simulator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evpretrain.events' has no attribute {name!r}")
    return getattr(import_module(f"evpretrain.events.{_EXPORTS[name]}"), name)
