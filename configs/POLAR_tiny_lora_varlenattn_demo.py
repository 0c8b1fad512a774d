# LoRA on the tiny random POLAR model and the demo data, for 2 CPU cores: the
# structure of the POLAR-1.8B/7B LoRA configs at toy sizes.
#
# Launch (from the repository root, after `mkdir -p work_dirs && python tools/make_tiny_model.py work_dirs/tiny_polar`):
#   xtuner train configs/POLAR_tiny_lora_varlenattn_demo.py --deepspeed configs/deepspeed/polar_zero2_cpu.json
# Convert (merged model, or --adapter for a PEFT directory):
#   bash tools/convert.sh configs/POLAR_tiny_lora_varlenattn_demo.py work_dirs/POLAR_tiny_lora_varlenattn_demo OUT
# Data: data/demo/*.jsonl, one prompt/reference/chosen/rejected record per line
# (see configs/POLAR_7B_full_varlenattn_custom_dataset.py for the format).
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from mmengine.optim import OptimWrapper
from mmengine.visualization import TensorboardVisBackend, Visualizer
from peft import LoraConfig
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
pretrained_model_name_or_path = "work_dirs/tiny_polar"
# Packed rows; on CPU PolarRewardModel keeps samples apart with per-sample SDPA.
use_varlen_attn = True
# True: each prompt and reference is encoded once per row and the candidates
# sharing them are scored after that one copy (docs/training.md, "Shared
# prefixes"); the loss of every pair is unchanged. Needs use_varlen_attn. On
# CPU the candidates attend through SDPA over segments; a demo epoch is 53 rows
# instead of 168 (bench/results/demo_seeds.json).
shared_prefix = True
# Activation checkpointing: True recomputes every layer's forward in backward
# (activations of one layer at a time), False keeps them all, k recomputes the
# first k layers. The tiny CPU model's activations are a few MB: False.
activation_checkpointing = False
# Liger Kernel's fused Triton kernels for RMSNorm, SwiGLU and rotary (docs/performance.md):
# CUDA only; on CPU the log says they are skipped and the eager modules run.
use_liger_kernel = False  # the CPU demo
reward_token_id = 4  # [UNUSED_TOKEN_130] in the tiny tokenizer; checked against it
loss_type = "ranking"
penalty_type = "none"
# Loss options (polar_xtuner/train/objectives.py), all off as in POLAR's published recipe:
margin = False  # True: -log sigmoid(s_c - s_r - m) with each record's "margin" field m (missing = 0)
center_rewards_coefficient = 0.0  # c > 0 adds c * mean((s_c + s_r)^2); 1e-2 keeps scores near 0
loss_in_fp32 = False  # True: scores and loss in fp32 whatever the training dtype

# LoRA (PEFT) on InternLM2's attention (wqkv, wo) and MLP (w1, w2, w3); the
# value head v_head is trained in full and saved with the adapters.
lora_r = 64
lora_alpha = 128
lora_dropout = 0.0
lora_target_modules = ["wqkv", "wo", "w1", "w2", "w3"]

# Data
data_files = "data/demo/train.jsonl"
max_length = 1024
max_response_length = 128
max_packed_length = max_length * 2
pack_seed = 0
# Encoded pairs are cached here and reused on restart and by every rank while
# the data files, tokenizer and lengths are unchanged (None: no cache).
data_cache_dir = "work_dirs/polar_data_cache"

# Parallel
sequence_parallel_size = 1

# Scheduler & Optimizer
batch_size = 1  # one packed row of up to max_packed_length tokens (~16 pairs)
accumulative_counts = 1
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 0
max_epochs = 3
optim_type = AdamW
# A tiny model from scratch needs a larger lr than POLAR's 1e-5; above ~1e-3
# the result starts to depend on the seed and the CPU (bench/README.md).
# Not LoRA's usual larger rate: on this random base 2e-3 and 1e-3 left some
# seeds near chance after 3 epochs; 5e-4, the full demo's, finds the answer
# comparison within the first epoch for every seed tried (bench/README.md).
lr = 5e-4
betas = (0.9, 0.95)
weight_decay = 0
# Fused AdamW (torch.optim.AdamW(fused=True)): one kernel per step for all parameters, also as
# DeepSpeed's client optimizer; the unfused update to fp32 rounding (tests/unit/test_configs.py).
fused_adamw = False  # the demo's learning curves were measured unfused (bench/README.md)
max_norm = 1
warmup_ratio = 0.03

# Save
save_steps = 500
save_total_limit = 2

# Evaluate preference accuracy on held-out pairs during training
val_files = "data/demo/val.jsonl"
evaluation_freq = 200

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
    lora=dict(
        type=LoraConfig,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules,
        bias="none",
    ),
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
# fp32 on CPU (AmpOptimWrapper needs a GPU); --deepspeed replaces this wrapper.
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused_adamw),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
)

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
custom_hooks = [
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
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=50),
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
    dist_cfg=dict(backend="gloo"),  # CPU ranks talk over gloo
)

visualizer = dict(type=Visualizer, vis_backends=[dict(type=TensorboardVisBackend)])
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)  # a reproducible demo
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
