"""Which torch device a command runs on, and the float32 arithmetic it runs with."""

from __future__ import annotations

import os

import torch

from .errors import DeviceError

IEEE = "ieee"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when torch sees a GPU, else the CPU; `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    return torch.device(name)


def pin_float32() -> None:
    """IEEE float32 for every matmul and convolution, on CUDA (no TF32: it keeps 10 mantissa bits,
    and log-weights of several hundred nats would move by more than the 0.01 nats results are
    quoted to) and on the CPU (no bfloat16 through oneDNN). Training, evaluation, the Ray
    trainable and the evaluation actor all call this before they compute; torch's new
    per-backend settings, because mixing them with the legacy `allow_tf32` flags is an error."""
    torch.backends.cuda.matmul.fp32_precision = IEEE
    torch.backends.cudnn.conv.fp32_precision = IEEE
    torch.backends.cudnn.rnn.fp32_precision = IEEE
    torch.backends.mkldnn.matmul.fp32_precision = IEEE
    torch.backends.mkldnn.conv.fp32_precision = IEEE
    # cuBLAS picks the same kernels run after run only with a fixed workspace; it must be set
    # before CUDA starts in this process (a later setting is ignored).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def float32_precision(device: torch.device) -> str:
    """The float32 precision matmuls and convolutions on `device` run with now, read back from
    torch (not assumed): `ieee`, or e.g. `matmul tf32, conv ieee` if something changed it."""
    backends = (
        {"matmul": torch.backends.cuda.matmul, "conv": torch.backends.cudnn.conv}
        if device.type == "cuda"
        else {"matmul": torch.backends.mkldnn.matmul, "conv": torch.backends.mkldnn.conv}
    )
    # "none" defers to the global setting, which is IEEE unless set_float32_matmul_precision lowered it.
    default = IEEE if torch.get_float32_matmul_precision() == "highest" else "tf32"
    seen = {
        name: backend.fp32_precision if backend.fp32_precision != "none" else default
        for name, backend in backends.items()
    }
    if set(seen.values()) == {IEEE}:
        return IEEE
    return ", ".join(f"{name} {value}" for name, value in seen.items())


def device_record(device: torch.device) -> dict[str, str | None]:
    """What results record of the device that computed them: its type, the float32 precision
    and, on CUDA, the GPU's name and compute capability (None on the CPU)."""
    record: dict[str, str | None] = {
        "device": device.type,
        "float32": float32_precision(device),
        "gpu_name": None,
        "gpu_capability": None,
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record.update(gpu_name=torch.cuda.get_device_name(device), gpu_capability=f"{major}.{minor}")
    return record
