"""Where torch work runs: device settings and CPU thread counts."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from puzzle_core.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(setting: str, local_rank: int = 0, what: str = "device") -> torch.device:
    """A device setting as a torch device.

    ``auto`` is this process's GPU (``local_rank``, from the executor's
    :class:`~puzzle_core.interfaces.ProcessRole`) when CUDA is present, else the CPU. A
    CUDA setting on a machine without CUDA, or a name torch does not know, is a
    :class:`UserError` naming the config field ``what``.
    """
    import torch

    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"{what} '{setting}' is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what} is '{setting}', but torch sees no CUDA device here. Use auto or cpu.")
    return device


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads (0: unchanged), restoring the previous count after."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
