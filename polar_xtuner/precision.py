"""The precision and device policy, in one place.

* Names: ``bf16``/``fp16``/``fp32`` (the command-line names) and the
  ``torch.dtype`` they stand for; HF configs spell them ``bfloat16``...
* Flash kernels (flash-attn, PyTorch's varlen attention, HF's
  flash_attention_2) take half precision only: bf16 where the GPU has it,
  else fp16.
* Evaluation and scoring: bf16 on a GPU that has it, else fp32 (CPU scores are
  exact, and fp16 would risk overflow in the score head), with one attention
  kernel, SDPA (``SCORING_ATTENTION``).
* Training never picks fp16 on its own: configs and DeepSpeed JSONs use bf16
  ("auto") on GPUs and fp32 on CPU.
* The varlen attention backend follows the tensors' device, not the machine:
  CPU tensors on a CUDA machine (the tests' tiny model) use SDPA in fp32.
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ALIASES = {**{v: k for k, v in HF_NAMES.items()}, **{k: k for k in DTYPES}, "half": "fp16", "float": "fp32"}
CUDA_BACKENDS = ("flash_attn", "torch_varlen")
# Every scoring path (eval, conversion's check, the hooks) uses one attention
# kernel: eager and SDPA differ by up to ~2e-3 on a trained model on some CPUs,
# which would read as a conversion error.
SCORING_ATTENTION = "sdpa"


def dtype_name(value) -> str:
    """The short name (bf16/fp16/fp32) of a name, an HF name or a ``torch.dtype``.

    Raises:
        ValueError: Not one of the three.
    """
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPES.items():
            if dtype == value:
                return name
        raise ValueError(f"dtype {value} is not one of {', '.join(DTYPES)}")
    key = str(value).replace("torch.", "").lower()
    if key not in _ALIASES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return _ALIASES[key]


def to_dtype(value) -> torch.dtype:
    """The ``torch.dtype`` of a name (bf16, bfloat16, torch.bfloat16...) or a dtype."""
    return DTYPES[dtype_name(value)]


def hf_name(value) -> str:
    """The HF config spelling (``bfloat16``...)."""
    return HF_NAMES[dtype_name(value)]


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def bf16_supported(device=None) -> bool:
    """bf16 kernels on this device (CPU: no; we score and train fp32 there)."""
    return _device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def half_dtype(device="cuda") -> torch.dtype:
    """The half precision flash kernels run in: bf16 where the GPU has it, else fp16."""
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def eval_dtype(device=None) -> torch.dtype:
    """The dtype to score in: bf16 on a GPU that has it, else fp32."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def training_dtype() -> torch.dtype:
    """The dtype flash_attention_2 training loads in: half precision on CUDA (see above), else fp32."""
    return half_dtype("cuda") if torch.cuda.is_available() else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_for(tensor: torch.Tensor, backend: str) -> str:
    """The varlen backend for tensors where they are: CUDA kernels only for CUDA tensors."""
    return backend if tensor.is_cuda or backend not in CUDA_BACKENDS else "sdpa"
