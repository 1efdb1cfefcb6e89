"""Choice of the torch device and of the CPU thread count."""

import logging

import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to train and embed on.

    Parameters
    ----------
    preference : {"auto", "cpu", "cuda"}
        ``"auto"`` picks CUDA when ``torch.cuda.is_available()`` and the CPU
        otherwise.

    Raises
    ------
    ValueError
        If ``preference`` is not one of the choices, or is ``"cuda"`` on a
        machine where torch finds no CUDA device.
    """
    if preference not in DEVICE_CHOICES:
        raise ValueError(
            f"Invalid device {preference!r}: expected one of {DEVICE_CHOICES}."
        )

    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"

    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device is 'cuda' but torch finds no CUDA device. Set device to "
            "'auto' or 'cpu' in the config, or install a CUDA build of torch."
        )

    device = torch.device(preference)
    logger.info("Using device %s", device)
    return device


def configure_threads(n_threads: int) -> None:
    """Set the number of CPU threads torch uses for intra-op parallelism."""
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}.")
    torch.set_num_threads(n_threads)
