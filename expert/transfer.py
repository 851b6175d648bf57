"""Host tensors to the device without making the host wait for the device.

PyTorch synchronizes the stream after a copy from ordinary (pageable) host memory to a GPU, so
`tensor.to("cuda")` holds the host until every kernel queued before it has run: a loop that
copies its next inputs that way cannot queue the next forward while the GPU runs the last one,
and the GPU idles while the host builds and launches it (the MMLU profile in bench/README: 25
such waits for 4 packs). A copy from pinned memory with `non_blocking=True` is queued on the
stream like a kernel instead; PyTorch's pinned-memory cache keeps the staging buffer until the
copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued behind the device's work rather than waiting for it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
