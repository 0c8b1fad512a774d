# POLAR-7B full fine-tuning on long contexts: packed (varlen) attention with
# sequence parallel, each packed row split across 4 GPUs (DeepSpeed ZeRO-3).
#
# Launch (from the repository root; GPUs with flash-attn only, refused on CPU):
#   NPROC_PER_NODE=8 bash scripts/train.sh configs/POLAR_7B_full_varlenattn_sp4_custom_dataset.py \
#     --deepspeed configs/deepspeed/polar_zero3.json
# (`NPROC_PER_NODE=8 xtuner train ...` runs the same, but always exits 0.)
# Your data: one JSON object per line, as in POLAR_7B_full_varlenattn_custom_dataset.py:
#   {"prompt":    [{"role": "user", "content": "What is the capital of China?"}],
#    "reference": [{"role": "assistant", "content": "Beijing."}],
#    "chosen":    [{"role": "assistant", "content": "Beijing."}],
#    "rejected":  [{"role": "assistant", "content": "Shanghai."}]}
# Point the config at it with
#   --cfg-options train_dataloader.dataset.data_files=/path/to/train.jsonl
# Differences from that config: 4-way sequence parallel (Ulysses all-to-all:
# each rank holds a quarter of the row and a quarter of the heads in attention),
# hence 4x the lengths. The number of GPUs must be a multiple of 4; the 32
# attention heads must divide by it. Accumulation is multiplied by the sequence
# parallel size, as xtuner does, so that each optimizer step sees as many rows
# as without it.
# Settings follow POLAR's published xtuner config (InternLM/POLAR).
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from mmengine.optim import AmpOptimWrapper
from mmengine.visualization import TensorboardVisBackend, Visualizer
from torch.optim import AdamW
from transformers import AutoModel, AutoTokenizer
from xtuner.engine.hooks import VarlenAttnArgsToMessageHubHook
from xtuner.engine.runner import TrainLoop
from xtuner.parallel.sequence import SequenceParallelSampler

from polar_xtuner.data.dataset import build_polar_dataset, polar_collate_fn
from polar_xtuner.train.eval_hook import PolarEvalHook
from polar_xtuner.train.model import PolarRewardModel
from polar_xtuner.train.schedulers import WarmupCosineAnnealingLR, WarmupLinearLR

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = "internlm/POLAR-7B-Base"
use_varlen_attn = True
# Shared prefixes (polar_xtuner/data/shared_prefix.py) are refused with sequence parallel.
shared_prefix = False
# Activation checkpointing: True recomputes every layer's forward in backward
# (activations of one layer at a time), False keeps them all, k recomputes the
# first k layers. Each of the 4 ranks holds 32768 tokens of a
# 131072-token row: 209 GiB of 7B activations without it, 14.5 GiB with it
# (docs/training.md, "Activation checkpointing and memory"): True.
activation_checkpointing = True
# Liger Kernel's fused Triton kernels for RMSNorm, SwiGLU and rotary (docs/performance.md):
# CUDA only; on CPU the log says they are skipped and the eager modules run.
use_liger_kernel = True
reward_token_id = 92527  # [UNUSED_TOKEN_130]; checked against the tokenizer
loss_type = "ranking"
penalty_type = "none"
# Loss options (polar_xtuner/train/objectives.py), all off as in POLAR's published recipe:
margin = False  # True: -log sigmoid(s_c - s_r - m) with each record's "margin" field m (missing = 0)
center_rewards_coefficient = 0.0  # c > 0 adds c * mean((s_c + s_r)^2); 1e-2 keeps scores near 0
loss_in_fp32 = False  # True: scores and loss in fp32 whatever the training dtype

# Data
data_files = "data/demo/train.jsonl"
max_length = 65536  # 4 x 16384: must divide by sequence_parallel_size
max_response_length = 16384
max_packed_length = max_length * 2
pack_seed = 0  # packing order, identical on every rank
# Encoded pairs are cached here and reused on restart and by every rank while
# the data files, tokenizer and lengths are unchanged (None: no cache).
data_cache_dir = "work_dirs/polar_data_cache"

# Parallel
sequence_parallel_size = 4

# Scheduler & Optimizer
batch_size = 1  # per device; with varlen attention one packed row
accumulative_counts = 2
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 0
max_epochs = 1  # more than one epoch over-fits a reward model
optim_type = AdamW
lr = 2e-5
betas = (0.9, 0.95)
weight_decay = 0
# Fused AdamW (torch.optim.AdamW(fused=True)): one kernel per step for all parameters, also as
# DeepSpeed's client optimizer; the unfused update to fp32 rounding (tests/unit/test_configs.py).
fused_adamw = True
max_norm = 1  # gradient clipping
warmup_ratio = 0.03
amp_dtype = "bfloat16"  # without --deepspeed; fp16 is prone to NaN in reward training

# Save
save_steps = 500
save_total_limit = 2  # checkpoints kept (-1: all)

# Evaluate preference accuracy on held-out pairs during training (None: off)
val_files = None  # e.g. "data/mine/val.jsonl" from tools/build_dataset.py --val-ratio
evaluation_freq = 500

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side="left",
)

model = dict(
    type=PolarRewardModel,
    use_varlen_attn=use_varlen_attn,
    loss_type=loss_type,
    penalty_type=penalty_type,
    margin=margin,
    center_rewards_coefficient=center_rewards_coefficient,
    loss_in_fp32=loss_in_fp32,
    use_activation_checkpointing=activation_checkpointing,
    use_liger_kernel=use_liger_kernel,
    llm=dict(
        type=AutoModel.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
sampler = SequenceParallelSampler if sequence_parallel_size > 1 else DefaultSampler

train_dataset = dict(
    type=build_polar_dataset,
    data_files=data_files,
    tokenizer=tokenizer,
    max_length=max_length,
    max_response_length=max_response_length,
    reward_token_id=reward_token_id,
    use_varlen_attn=use_varlen_attn,
    max_packed_length=max_packed_length,
    shuffle_before_pack=True,
    seed=pack_seed,
    cache_dir=data_cache_dir,
    shared_prefix=shared_prefix,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=sampler, shuffle=True),
    collate_fn=dict(type=polar_collate_fn, use_varlen_attn=use_varlen_attn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# With --deepspeed, xtuner replaces this wrapper and the dtype comes from the
# DeepSpeed JSON (bf16 on GPUs that have it).
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused_adamw),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale="dynamic",
    dtype=amp_dtype,
)

# Linear warm-up from ~0 over the first 3% of the epoch, then cosine to 0.1 x lr.
param_scheduler = [
    dict(
        type=WarmupLinearLR,
        start_factor=lr * 0.1,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type=WarmupCosineAnnealingLR,
        eta_min=lr * 0.1,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = []
if val_files:
    custom_hooks += [
        dict(
            type=PolarEvalHook,
            data_files=val_files,
            tokenizer=tokenizer,
            interval=evaluation_freq,
            max_length=max_length,
            max_response_length=max_response_length,
            shared_prefix=shared_prefix,
        ),
    ]
if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit,
    ),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)

visualizer = dict(type=Visualizer, vis_backends=[dict(type=TensorboardVisBackend)])
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)

# xtuner's CLI refuses a top-level `use_varlen_attn = True` unless flash-attn is
# installed, although PolarRewardModel keeps packed samples apart without it
# (PyTorch varlen on CUDA, per-sample SDPA on CPU). The flag lives on in
# `model`, `train_dataset` and `collate_fn` above; only the name is dropped.
del use_varlen_attn

# mmengine's Runner reads a top-level `activation_checkpointing` as a list of
# sub-module names to wrap in its own checkpoint (whose recompute would not
# replay a packed row's layout). The setting lives on in `model` above
# (`use_activation_checkpointing`); only the name is dropped.
del activation_checkpointing
