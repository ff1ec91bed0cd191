"""One meaning for `extract.dtype: auto`, whichever backend scores.

Left to themselves the backends disagree: on a CPU, vLLM's `auto` downcasts a float32
checkpoint to bfloat16 while transformers keeps float32 (the same shards then differ in top-k ids
at several percent of the slots); on a GPU, vLLM's `auto` means float16 for a float32 checkpoint
while transformers picks bfloat16. Here `auto` is resolved once, from the device the scorer
runs on, and both backends get the explicit result:

* CPU: ``float32``. CPUs compute it at full speed on every instruction set, and it is the
  precision a checkpoint's log-probs are checked against.
* GPU: ``bfloat16``, the precision the target trains in (float16's narrow range is what gave
  the reference its NaN losses). A GPU without bfloat16 (compute capability below 8.0: V100,
  T4) is refused with a message to set ``extract.dtype: float16``, rather than silently given
  a different precision than the same job gets on a newer GPU.

Pure functions; the device checks import torch only when called.
"""

from __future__ import annotations

from typing import Literal

from fusion_etl.errors import UserError

__all__ = ["AUTO_DTYPE", "Device", "check_dtype_supported", "resolve_dtype"]

Device = Literal["cpu", "cuda"]

AUTO_DTYPE: dict[Device, str] = {"cpu": "float32", "cuda": "bfloat16"}
"""What `auto` means on each kind of device."""

_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(requested: str, *, device: Device) -> str:
    """The explicit dtype for a requested one: `auto` by the device, anything else as given.

    Raises:
        ValueError: A dtype that is neither `auto` nor one of float32, bfloat16, float16.
    """
    if requested == "auto":
        return AUTO_DTYPE[device]
    if requested not in _DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; expected auto or one of {_DTYPES}")
    return requested


def check_dtype_supported(dtype: str, *, device: Device, requested: str) -> None:
    """Refuses bfloat16 on a GPU without it, naming the setting to change.

    Raises:
        UserError: bfloat16 on a CUDA device whose compute capability is below 8.0.
    """
    if device != "cuda" or dtype != "bfloat16":
        return
    import torch

    # Compute capability, not torch.cuda.is_bf16_supported(), which also counts emulation.
    if torch.cuda.get_device_capability() < (8, 0):
        name = torch.cuda.get_device_name()
        why = "extract.dtype auto means bfloat16 on GPUs" if requested == "auto" else ""
        raise UserError(
            f"{name} has no bfloat16 support{f' ({why})' if why else ''}; "
            "set extract.dtype: float16 for this GPU"
        )
