# POLAR-1.8B continued pre-training by policy discrimination (POLAR's own
# objective), on samples of your policies.
#
# Launch (from the repository root):
#   NPROC_PER_NODE=8 xtuner train configs/POLAR_1_8B_policy_discrimination_pretrain.py --deepspeed deepspeed_zero2
# Data: triples built by
#   python tools/build_dataset.py samples.jsonl --from policies --pairs-per-prompt 4 -o data/pdl
# from one record per prompt with samples of several policies,
#   {"prompt": "...", "samples": [{"policy": "mine-v3", "response": "..."},
#                                 {"policy": "mine-v3", "response": "..."},
#                                 {"policy": "other", "response": "..."}]}
# Each triple takes the reference and the chosen answer from one policy and the
# rejected answer from another; the loss is the fine-tuning one (Bradley-Terry).
# Point `data_files` at data/pdl/train.jsonl (default: the triples built from
# data/examples/policies.jsonl, a smoke test).
#
# Settings. From the POLAR paper (arXiv 2507.05197, appendix D.1, 1.8B
# pre-training): one epoch; learning rate 1.4e-5; answers of up to 4096 tokens
# after prefixes of 1 to 1024 tokens; a global batch of 1940. Ours, where the
# paper gives none: AdamW with betas (0.9, 0.95), no weight decay, clipping at
# 1, 3% linear warm-up then cosine to 0.1 x lr (the published fine-tuning
# configs' values), max_length 10244 (two 1024-token prefixes, two
# 4096-token answers and 4 template tokens), and accumulative_counts = 8:
# the global batch is GPUs x accumulative_counts x triples per packed row (~8
# at these lengths), so 32 GPUs give about the paper's 1940. Starting from
# POLAR-1_8B-Base continues its pre-training; the paper started from
# InternLM2.5-1.8B.
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
pretrained_model_name_or_path = "internlm/POLAR-1_8B-Base"
use_varlen_attn = True
# True: each prompt and reference is encoded once per row and the candidates
# sharing them are scored after that one copy (docs/training.md, "Shared
# prefixes"); the loss of every pair is unchanged. Needs use_varlen_attn.
shared_prefix = True
# Activation checkpointing: True recomputes every layer's forward in backward
# (activations of one layer at a time), False keeps them all, k recomputes the
# first k layers. At max_packed_length = 32768 a 1.8B row keeps
# 84 GiB of activations without it and 6.5 GiB with it (measured per layer;
# docs/training.md, "Activation checkpointing and memory"): True fits one 80 GB GPU.
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
data_files = "data/examples/policy_triples.jsonl"  # e.g. data/pdl/train.jsonl
max_length = 2 * 1024 + 2 * 4096 + 4  # ours: two 1024-token prefixes, two 4096-token answers, the template
max_response_length = 4096  # paper: trajectories of up to 4096 tokens
max_packed_length = max_length * 2
pack_seed = 0  # packing order, identical on every rank
# Encoded pairs are cached here and reused on restart and by every rank while
# the data files, tokenizer and lengths are unchanged (None: no cache).
data_cache_dir = "work_dirs/polar_data_cache"

# Parallel
sequence_parallel_size = 1

# Scheduler & Optimizer
batch_size = 1  # per device; with varlen attention one packed row
accumulative_counts = 8  # ours: ~1940 triples per step on 32 GPUs (see the header)
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 0
max_epochs = 1  # paper: one epoch
optim_type = AdamW
lr = 1.4e-5  # paper, 1.8B pre-training
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
