"""Two CPU ranks check PolarRewardModel's sequence-parallel varlen attention.

Run by tests/integration/train/test_attention.py as
``torchrun --nproc_per_node=2 tests/assets/sp_worker.py MODEL_DIR``. Each rank
feeds its half of one packed row through the model with xtuner's sequence
parallel group of 2 (Ulysses all-to-all over gloo) and must get its half of
the hidden states, and together the gradients, of the whole row run on one
rank, with activation checkpointing on as the sp4 config ships it. (xtuner 0.2.0 gathers the value-head scores with a collective that
refuses CPU tensors, so the full training step is GPU-only; this checks
everything up to that point.) Prints "OK <rank> <max diff>" on success.
"""
import sys

import torch
import torch.distributed as dist
from polar_xtuner.train.layout import Packed, row_layout
from polar_xtuner.train.model import PolarRewardModel


def main(model_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # activation checkpointing on, as the sp4 config ships it: every layer's recompute
    # repeats the all-to-all under the row's layout
    model = PolarRewardModel.from_model_dir(model_dir, use_varlen_attn=True, use_activation_checkpointing=True,
                                            loss_type="ranking", penalty_type="none").train()
    lengths = [37, 50, 21, 60, 32]  # five packed samples, 200 tokens
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.llm.config.vocab_size, (1, total), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    weight = torch.randn(1, total, model.llm.config.hidden_size, generator=gen)
    cu = torch.tensor([0] + lengths).cumsum(0)
    layout = Packed.of(cu, max(lengths), "cpu")  # the whole row's bounds, on every rank

    # the whole row on this rank (sequence parallel size 1)
    with row_layout(layout):
        full = model.llm(input_ids=ids, position_ids=pos)[0]
    (full * weight).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # xtuner caches the size-1 answers of its first calls: start its state afresh
    import xtuner.parallel.sequence.setup_distributed as state

    for name in [v for v in vars(state) if v.startswith("_") and v.isupper()]:
        setattr(state, name, None)
    from xtuner.parallel.sequence import init_sequence_parallel

    init_sequence_parallel(2)
    half = slice(rank * total // 2, (rank + 1) * total // 2)
    with row_layout(layout):
        part = model.llm(input_ids=ids[:, half], position_ids=pos[:, half])[0]
    torch.testing.assert_close(part, full[:, half].detach(), atol=1e-5, rtol=1e-5)
    (part * weight[:, half]).sum().backward()
    worst = 0.0
    for name, grad in want.items():
        got = model.get_parameter(name).grad.clone()
        dist.all_reduce(got)  # the row's gradient is the sum of the two halves'
        torch.testing.assert_close(got, grad, atol=1e-4, rtol=1e-4, msg=name)
        worst = max(worst, (got - grad).abs().max().item())
    print(f"OK {rank} {worst:.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
