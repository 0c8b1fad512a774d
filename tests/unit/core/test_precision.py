"""precision: every dtype name, and the CPU choices (fp32, SDPA)."""
import pytest
import torch

from polar_xtuner import precision


@pytest.mark.parametrize("name, want", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("torch.bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                        ("half", torch.float16), ("float16", torch.float16),
                                        ("fp32", torch.float32), ("float", torch.float32),
                                        ("FLOAT32", torch.float32), (torch.float32, torch.float32)])
def test_every_spelling_names_one_dtype(name, want):
    assert precision.to_dtype(name) == want
    assert precision.hf_name(name) == str(want).replace("torch.", "")


@pytest.mark.parametrize("bad", ["int8", "fp8", "", torch.int64])
def test_other_dtypes_are_refused(bad):
    with pytest.raises(ValueError, match="dtype"):
        precision.dtype_name(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU policy")
def test_cpu_scores_and_trains_in_fp32_with_sdpa():
    assert precision.eval_dtype() == torch.float32 and precision.training_dtype() == torch.float32
    assert precision.default_device() == "cpu" and not precision.bf16_supported()
    cpu = torch.zeros(1)
    assert precision.backend_for(cpu, "flash_attn") == "sdpa" and precision.backend_for(cpu, "torch_varlen") == "sdpa"
    assert precision.backend_for(cpu, "sdpa") == "sdpa" and precision.SCORING_ATTENTION == "sdpa"
