"""Conversion memory: the converter's cast frees the memory-mapped fp32 pages as it goes (fast, no training),
and bench/convert_memory.py records a conversion's figures only once its directory is read back whole."""
import os

import pytest
import torch

from polar_xtuner.train.checkpoint import cast_releasing

pytestmark = pytest.mark.integration


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _mapped_model(tmp_path, n_features=4096, layers=6):
    model = torch.nn.Sequential(*[torch.nn.Linear(n_features, n_features, bias=False) for _ in range(layers)])
    path = str(tmp_path / "iter_1.pth")
    torch.save(model.state_dict(), path)
    state = torch.load(path, mmap=True)
    with torch.device("meta"):
        mapped = torch.nn.Sequential(*[torch.nn.Linear(n_features, n_features, bias=False) for _ in range(layers)])
    mapped.load_state_dict(state, assign=True)
    return model, mapped, state, path


def test_cast_equals_to_and_leaves_the_source_readable(tmp_path):
    model, mapped, state, path = _mapped_model(tmp_path, 256, 2)
    cast_releasing(mapped, torch.bfloat16, [path])
    for (name, want), got in zip(model.state_dict().items(), mapped.state_dict().values()):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), name
        # dropped pages of the private file mapping are read again from the file
        assert torch.equal(state[name], want), name


def test_cast_gives_back_the_fp32_pages(tmp_path):
    model, mapped, state, path = _mapped_model(tmp_path)  # 6 x 64 MiB of fp32
    size = sum(p.numel() * 4 for p in model.parameters())
    del model
    for p in mapped.parameters():
        p.detach().sum()  # read every fp32 page of the mapping, as scoring does
    before = _rss()
    cast_releasing(mapped, torch.bfloat16, [path])
    grown = _rss() - before
    # Module.to would add the bf16 copy (+0.5x) and keep the fp32 pages; here they go (-1x).
    assert grown < -0.25 * size, (grown, size)


def test_verification_scores_with_the_kernel_the_saved_model_loads_with(tiny_dir):
    """CI once failed a good conversion by 2.3e-3: the check built the checkpoint model
    with eager attention (the model config's) and reloaded the saved one with SDPA."""
    from polar_xtuner.train.checkpoint import assign_state_dict, build_empty_model
    from polar_xtuner.scoring.local import load_model, score_records

    saved, tok = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    built = build_empty_model(tiny_dir, torch.float32)
    assign_state_dict(built, {k: v.clone() for k, v in saved.state_dict().items()}, torch.float32)
    built.eval()
    assert type(built.model.layers[0].attention).__name__ == type(saved.model.layers[0].attention).__name__
    recs = [{"prompt": "p " * 40, "reference": "r", "chosen": "a b c", "rejected": "d " * 30}] * 3
    assert score_records(built, tok, recs) == score_records(saved, tok, recs)


def test_weight_check_names_any_tensor_that_is_not_the_trained_one():
    import pytest

    from polar_xtuner.convert.export import check_weights, weight_digests
    from polar_xtuner.errors import VerificationError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    expected = weight_digests(model)
    check_weights(expected, weight_digests(model), "out")
    with torch.no_grad():
        model[1].weight[0, 0] = torch.nextafter(model[1].weight[0, 0], torch.tensor(1.0))  # one ulp
    with pytest.raises(VerificationError, match=r"changed: 1\.weight"):
        check_weights(expected, weight_digests(model), "out")
    with pytest.raises(VerificationError, match=r"missing: 0\.bias"):
        check_weights(expected, {k: v for k, v in expected.items() if k != "0.bias"}, "out")


# -- bench/convert_memory.py: the conversion section records only a conversion it read back whole ----------


def _converted_copy(tiny_dir, dst):
    """The tiny model's directory as a conversion writes it, and the tensors its checkpoint holds."""
    import shutil

    from bench.convert_memory import checkpoint_tensors

    shutil.copytree(tiny_dir, dst)
    return checkpoint_tensors(tiny_dir)


def test_a_written_directory_is_read_back_tensor_by_tensor(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from bench.convert_memory import verify_converted
    from bench.report import CheckFailed

    out = tmp_path / "hf"
    expected = _converted_copy(tiny_dir, out)
    got = verify_converted(str(out), expected, "fp32")
    assert got == {"tensors": len(expected), "bytes": 4 * sum(torch.Size(s).numel() for s in expected.values())}
    with pytest.raises(CheckFailed, match=r"is F32, expected BF16 \(bf16\)$"):
        verify_converted(str(out), expected, "bf16")  # the dtype asked for, not what was written

    weights = load_file(out / "model.safetensors")
    dropped = sorted(weights)[-1]
    save_file({k: v for k, v in weights.items() if k != dropped}, out / "model.safetensors")
    with pytest.raises(CheckFailed) as e:
        verify_converted(str(out), expected, "fp32")
    assert str(e.value) == f"{out}: 1 of the checkpoint's {len(expected)} tensors missing ({dropped})"

    (out / "model.safetensors").unlink()
    with pytest.raises(CheckFailed, match=r": no \.safetensors file written$"):
        verify_converted(str(out), expected, "fp32")


def test_a_conversion_that_wrote_nothing_records_no_figure(tmp_path, monkeypatch):
    """The section's old failure: a converter command that did nothing and exited 0 was timed as a conversion."""
    import bench.convert_memory as section
    from bench.report import CheckFailed

    monkeypatch.setattr(section, "convert_peak", lambda cfg, ckpt, out, dtype: (os.makedirs(out) or 1, 0.1))
    with pytest.raises(CheckFailed, match=r"hf_fp32: no \.safetensors file written$"):
        section.measure("tiny", str(tmp_path))


def test_the_conversion_section_records_a_verified_conversion(tmp_path):
    from bench.convert_memory import checkpoint_tensors, measure

    got = measure("tiny", str(tmp_path))
    assert got["convert_verified"] is True
    n = len(checkpoint_tensors(str(tmp_path / "model")))
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        assert got[f"convert_{dtype}_tensors"] == n and got[f"convert_{dtype}_bytes_written"] == size * got["params"]
        assert got[f"convert_{dtype}_peak_rss_bytes"] > 100 * 2**20  # the converter's imports, at least
        assert (tmp_path / f"hf_{dtype}" / "polar_encoding.json").is_file()  # what the converter writes
