"""Random-number-generator states as checkpoint-safe values, and seeding that leaves the caller's streams alone.

``torch.load(weights_only=True)`` accepts tensors, dicts, lists, numbers, strings and None only, so Python's
and numpy's Mersenne-Twister states travel as int64 tensors.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global RNG, torch's CPU RNG and every CUDA device's RNG."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored when this process has as many devices."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_all(seed: int, *, cuda: bool = True) -> None:
    """Seed Python's, numpy's and torch's CPU (and, with ``cuda``, every CUDA) global RNG.

    numpy takes the low 32 bits.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch``: independent streams per sample, the same on every run."""
    low, high = np.random.SeedSequence((seed, epoch, index)).generate_state(2, np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


@contextlib.contextmanager
def preserved_rng(seed: int | None = None, *, cuda: bool = False) -> Iterator[None]:
    """Run a block on its own random streams (seeded with ``seed`` when given) and restore the caller's after.

    Without ``cuda`` (the default) only the CPU generators are seeded, saved and restored: right for data loading,
    which runs on the CPU, while the training step's dropout on a GPU keeps drawing from its own CUDA stream.
    """
    state = capture_rng_state() if cuda else _capture_cpu_state()
    try:
        if seed is not None:
            seed_all(seed, cuda=cuda)
        yield
    finally:
        if cuda:
            restore_rng_state(state)
        else:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])


def _capture_cpu_state() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()
