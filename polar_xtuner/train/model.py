"""The reward model class every config uses: xtuner's RewardModel, made safe.

:class:`PolarRewardModel` subclasses ``xtuner.model.reward.RewardModel`` and
changes only what breaks or misleads:

* xtuner 0.2.0 picks the dtype with ``torch.<device>.is_bf16_supported()``,
  which does not exist for CPU, so building any reward model on a CPU machine
  crashes. Here the attention implementation and dtype are chosen per device:
  flash_attention_2 in bf16 (fp16 where bf16 is missing) on a GPU with
  flash-attn, PyTorch SDPA otherwise, float32 on CPU.
* A config that names ``attn_implementation="flash_attention_2"`` where
  flash-attn cannot be imported is refused with a message that says what to
  install or set, instead of failing deep inside transformers.
* ``use_varlen_attn=True`` packs several sequences in one row. xtuner only
  honours it through flash-attn and silently skips it otherwise, so packed
  samples would attend to each other. Here every backend of
  :mod:`polar_xtuner.train.attention` (flash-attn, PyTorch varlen, exact SDPA)
  keeps samples apart; ``varlen_attn_backend`` forces one.
* Every weight must come from the checkpoint: a model without ``v_head`` (a
  plain language model) or with weights missing is refused, where xtuner would
  give it a fresh zero head or leave uninitialised memory.
* The loss of each step is the mean over that row's pairs. xtuner scales by
  the mean over ranks of 1/pairs, so a rank's loss depends on how many pairs
  the other ranks drew and N ranks do not train like one rank accumulating N
  steps. With a local mean they do (DeepSpeed averages the ranks' gradients
  as accumulation averages the steps').
* With LoRA, xtuner's ``state_dict`` keeps only the adapters, so the trained
  value head was lost from every .pth checkpoint (and a conversion silently
  exported the base model's head). Here the head stays trainable and is
  saved with the adapters. QLoRA (a 4-bit ``quantization_config``) on a
  machine without CUDA is refused: bitsandbytes' 4-bit kernels need a GPU.
* Packed rows stay packed under activation checkpointing. The row's attention
  layout (varlen bounds, shared-prefix groups) is built once per step and
  handed to every layer's recompute as an argument; xtuner only published it
  in a MessageHub entry, which a recompute of a shared-prefix row did not see
  (candidates then attended to their siblings: wrong gradients, right loss).
  ``activation_checkpointing`` may also recompute only the first k layers.
* The loss takes the options of :mod:`polar_xtuner.train.objectives` (a per-record
  margin, reward centering, the loss in fp32), all off by default, and logs
  each term.
"""

from __future__ import annotations

import logging

import torch
from mmengine.logging import print_log
from xtuner.model.reward import RewardModel, reduce_mean, reduce_sum
from xtuner.parallel.sequence import (
    gather_forward_split_backward,
    get_sequence_parallel_group,
    get_sequence_parallel_world_size,
)

from polar_xtuner.errors import ConfigError, UserError, abort_training
from polar_xtuner.hf_layout import hub_unreachable, refuse_untrusted_code
from polar_xtuner.precision import training_dtype
from polar_xtuner.train.attention import (
    FLEX_CPU_TRAINING,
    available_backends,
    dispatch_varlen_attention,
    select_backend,
    sequence_parallel_size,
    shared_prefix_backend,
    varlen_args,
)
from polar_xtuner.train.layout import WHOLE, Packed, SharedPrefix, checkpoint_setting, install_recompute, row_layout
from polar_xtuner.train.liger import apply_liger_kernel
from polar_xtuner.train.objectives import LossSettings, pair_loss_terms

QLORA_NEEDS_GPU = (
    "QLoRA (a 4-bit quantization_config on model.llm) needs a CUDA GPU: bitsandbytes' 4-bit kernels "
    "do not run on this machine; use a LoRA config (configs/*_lora_*.py) on CPU"
)

SP_NEEDS_GPU = (
    "sequence parallel (sequence_parallel_size > 1) runs on GPUs only: xtuner 0.2.0 requires "
    "flash-attn for it and gathers the scores with a collective that refuses CPU tensors; "
    "set sequence_parallel_size = 1 on CPU"
)


def flash_attn_available() -> bool:
    """flash-attn is importable and a CUDA device is present."""
    return "flash_attn" in available_backends()


class PolarRewardModel(RewardModel):
    """xtuner's RewardModel with device-aware attention and loud refusals.

    Takes the arguments of ``xtuner.model.reward.RewardModel``, plus
    ``varlen_attn_backend`` ("flash_attn", "torch_varlen", "sdpa" or None for
    the best available), ``use_liger_kernel`` (:mod:`polar_xtuner.train.liger`) and the loss options of
    :class:`polar_xtuner.train.objectives.LossSettings` (``margin``,
    ``center_rewards_coefficient``, ``loss_in_fp32``).
    ``use_activation_checkpointing`` is a config's ``activation_checkpointing``:
    True (every layer recomputed in backward), False, or k (the first k layers);
    every recompute replays its row's attention layout (:mod:`polar_xtuner.train.layout`).

    Exits:
        With code 2 and one ``error:`` line (a :class:`ConfigError`) for an
        unavailable varlen backend, sequence parallel without varlen
        attention, on CPU, or with a size that does not divide the heads,
        flash_attention_2 without flash-attn, a loaded model that has no
        value head or misses weights, a bad loss option, or QLoRA without CUDA.
    """

    def __init__(
        self,
        llm,
        lora=None,
        peft_model=None,
        use_activation_checkpointing=True,
        use_varlen_attn=False,
        tokenizer=None,
        max_position_embeddings=None,
        reward_token_id=None,
        loss_type="ranking",
        penalty_type="log_barrier",
        penalty_weight=0.01,
        varlen_attn_backend=None,
        margin=False,
        center_rewards_coefficient=0.0,
        loss_in_fp32=False,
        shared_prefix_attn_backend=None,
        use_liger_kernel=False,
    ):
        try:
            recompute = checkpoint_setting(use_activation_checkpointing)
            self_loss = LossSettings(margin=margin, center_rewards_coefficient=center_rewards_coefficient,
                                     loss_in_fp32=loss_in_fp32)
            if isinstance(llm, dict) and llm.get("quantization_config") is not None \
                    and not torch.cuda.is_available():
                raise ConfigError(QLORA_NEEDS_GPU)
            if loss_type not in ("ranking", "focal"):
                raise ConfigError(f"loss_type must be 'ranking' or 'focal', got {loss_type!r}")
            backend = None
            sp = sequence_parallel_size()
            if sp > 1 and not use_varlen_attn:
                raise ConfigError(
                    "sequence parallel (sequence_parallel_size > 1) needs use_varlen_attn = True: "
                    "PolarRewardModel splits rows across ranks only in its varlen attention"
                )
            if use_varlen_attn:
                backend = select_backend(varlen_attn_backend)
            super().__init__(
                llm, lora=lora, peft_model=peft_model,
                use_activation_checkpointing=recompute != "off",
                # xtuner's own varlen dispatch is skipped: ours covers every backend.
                use_varlen_attn=False, tokenizer=tokenizer,
                max_position_embeddings=max_position_embeddings, reward_token_id=reward_token_id,
                loss_type=loss_type, penalty_type=penalty_type, penalty_weight=penalty_weight,
            )
            self.use_varlen_attn = use_varlen_attn
            self.varlen_attn_backend = backend
            # checked now, chosen per row's device (shared_prefix_backend)
            shared_prefix_backend(shared_prefix_attn_backend, "cpu")
            self.shared_prefix_attn_backend = shared_prefix_attn_backend
            if self.use_lora:
                self.v_head.requires_grad_(True)  # trained beside the adapters, and saved with them
            self.loss_settings = self_loss
            self._warned_unused_margins = False
            if self_loss != LossSettings():
                print_log(f"PolarRewardModel: loss options {self_loss}", "current")
            heads = getattr(self.llm.config, "num_attention_heads", 0)
            if sp > 1 and heads % sp:
                raise ConfigError(
                    f"sequence_parallel_size = {sp} must divide the model's {heads} attention heads"
                )
            if sp > 1 and not torch.cuda.is_available():
                raise ConfigError(SP_NEEDS_GPU)
            if use_varlen_attn:
                n = dispatch_varlen_attention(self.llm, backend)
                print_log(f"PolarRewardModel: varlen attention backend '{backend}' on {n} layers", "current")
            print_log(f"PolarRewardModel: {apply_liger_kernel(self.llm, use_liger_kernel)}", "current")
            # last: xtuner and PEFT (re)enable checkpointing above; each recompute must replay its row's layout
            self.activation_checkpointing = recompute
            if recompute != "off":
                k = install_recompute(self.llm, recompute)
                print_log(f"PolarRewardModel: activation checkpointing {recompute!r} ({k} layers recomputed)",
                          "current")
        except ConfigError as e:
            abort_training(e)  # built inside the training loop: one line and exit 2, not a traceback

    def state_dict(self, *args, **kwargs):
        """xtuner's (the adapters alone under LoRA), plus the value head under LoRA."""
        out = super().state_dict(*args, **kwargs)
        if self.use_lora:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            keep_vars = kwargs.get("keep_vars", args[2] if len(args) > 2 else False)
            out.update(self.v_head.state_dict(prefix=prefix + "v_head.", keep_vars=keep_vars))
        return out

    @classmethod
    def from_model_dir(cls, path: str, **kwargs) -> "PolarRewardModel":
        """Build over a model directory the way a config's ``llm`` dict does."""
        from mmengine.config import ConfigDict
        from transformers import AutoModel

        llm = ConfigDict(type=AutoModel.from_pretrained, pretrained_model_name_or_path=path, trust_remote_code=True)
        return cls(llm=llm, **kwargs)

    def _dispatch_lm_model_cfg(self, cfg, max_position_embeddings=None):
        # xtuner reads the model's config here first: an unreachable hub name fails in this call
        try:
            return super()._dispatch_lm_model_cfg(cfg, max_position_embeddings)
        except OSError as e:
            raise ConfigError(str(hub_unreachable(cfg.get("pretrained_model_name_or_path"),
                                                  "the config's model", e))) from None

    def _build_from_cfg_or_module(self, cfg_or_mod):
        # Load with loading info: xtuner builds under LoadWoInit, so a weight
        # missing from the checkpoint would stay uninitialised memory, and a
        # model without v_head would get a fresh zero head, both silently.
        if isinstance(cfg_or_mod, dict) and getattr(cfg_or_mod.get("type"), "__name__", "") == "from_pretrained":
            try:
                refuse_untrusted_code(cfg_or_mod.get("pretrained_model_name_or_path"), "the config's model")
            except UserError as e:
                raise ConfigError(str(e)) from None
            cfg_or_mod = dict(cfg_or_mod, output_loading_info=True)
            try:
                model, info = super()._build_from_cfg_or_module(cfg_or_mod)
            except OSError as e:  # a hub name on an offline machine: one line saying what to do
                raise ConfigError(str(hub_unreachable(cfg_or_mod.get("pretrained_model_name_or_path"),
                                                      "the config's model", e))) from None
            missing = list(info.get("missing_keys", []))
            if missing:
                raise ConfigError(
                    f"{cfg_or_mod.get('pretrained_model_name_or_path')}: weights missing from the "
                    f"checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
                )
        else:
            model = super()._build_from_cfg_or_module(cfg_or_mod)
        if not hasattr(model, "v_head"):
            raise ConfigError(
                f"{type(model).__name__} has no value head (v_head): pretrained_model_name_or_path "
                "must point to a POLAR reward model (InternLM2ForRewardModel), not a language model"
            )
        return model

    def forward(self, data, data_samples=None, mode="loss"):
        """xtuner's forward (``loss``, ``predict``, ``tensor``) under the row's attention layout.

        The layout (:mod:`polar_xtuner.train.layout`) is built once from the
        row: a shared-prefix row's groups, else the varlen bounds (``cumulative_len``
        and ``max_seqlen`` in ``data``, or where xtuner's
        ``VarlenAttnArgsToMessageHubHook`` published them), else whole rows. Every
        attention forward of this call, activation-checkpoint recomputes
        included, uses that one layout.
        """
        with row_layout(self.layout_of(data, mode)):
            return super().forward(data, data_samples, mode)

    def layout_of(self, data, mode: str = "loss"):
        """The attention layout of ``data``'s row; pops the varlen keys from ``data``.

        Exits (code 2, one line) for a training row of a varlen model that
        carries no sample bounds: attending over the whole packed row would
        let its samples see each other. (A batch of several rows is padded,
        not packed: xtuner packs one row per batch.)
        """
        cu, max_seqlen = data.pop("cumulative_len", None), data.pop("max_seqlen", None)
        shared = data.get("shared_prefix")
        if shared is not None:
            # inside the training loop: one line and exit 2 (abort_training), not a traceback
            if get_sequence_parallel_world_size() > 1:
                abort_training(ConfigError("shared_prefix = True does not work with sequence parallel "
                                           "(sequence_parallel_size > 1): set shared_prefix = False"))
            if not self.use_varlen_attn:
                abort_training(ConfigError("shared_prefix = True needs use_varlen_attn = True "
                                           "(one packed row per step)"))
            device = data["input_ids"].device
            backend = shared_prefix_backend(self.shared_prefix_attn_backend, device)
            if backend == "flex" and device.type == "cpu" and torch.is_grad_enabled():
                abort_training(ConfigError(FLEX_CPU_TRAINING))
            return SharedPrefix(shared.group_ids.to(device), shared.member_ids.to(device), backend)
        if not self.use_varlen_attn:
            return WHOLE
        if cu is None:
            cu, max_seqlen = varlen_args()
        if cu is None:
            if mode == "loss" and data["input_ids"].shape[0] == 1:  # packed rows come one per batch
                abort_training(ConfigError(
                    "use_varlen_attn = True but this training row carries no sample bounds: add "
                    "VarlenAttnArgsToMessageHubHook to custom_hooks (every shipped config has it) or keep "
                    "polar_collate_fn's cumulative_len in the batch"))
            return WHOLE  # a padded batch: several rows, or predict / tensor
        return Packed.of(cu, max_seqlen, data["input_ids"].device)

    def compute_loss(self, data, labels=None):
        """The reward loss of one batch, with its terms for the log.

        ``data`` may carry ``margins`` (one per pair, from
        :func:`polar_xtuner.data.dataset.polar_collate_fn`). The chosen and
        rejected scores are read at the reward tokens (labels 0 and 1), in
        pair order. Stops at the first non-finite loss: reward training in
        fp16 is prone to overflow, and training on after a NaN silently ruins
        the model.
        """
        margins = data.pop("margins", None)
        shared = data.pop("shared_prefix", None)
        sp = get_sequence_parallel_world_size() > 1
        if shared is not None:
            chosen, rejected, hidden_states = self._shared_prefix_scores(data, shared)
            margins = shared.margins
        else:
            if sp:
                data = self._split_for_sequence_parallel(data)
            hidden_states = self.llm(**data)[0]
            logits = self.v_head(hidden_states)
            if sp:
                logits = gather_forward_split_backward(logits, dim=1, sp_group=get_sequence_parallel_group(),
                                                       grad_scale="up")
            chosen = logits[labels == 0].reshape(-1)
            rejected = logits[labels == 1].reshape(-1)
        settings = self.loss_settings
        if margins is not None:
            margins = margins.to(chosen.device)
            if len(margins) != len(chosen):
                raise ValueError(f"{len(margins)} margins for {len(chosen)} pairs in a batch")
            if not settings.margin and bool(margins.any()) and not self._warned_unused_margins:
                print_log("PolarRewardModel: the data carries margins but margin = False; "
                          "they are not used (set margin = True to use them)", "current", level=logging.WARNING)
                self._warned_unused_margins = True
        terms = pair_loss_terms(chosen, rejected, settings, margins, self.loss_type)
        loss = terms["loss"]
        scores = torch.cat([chosen, rejected])
        if settings.loss_in_fp32:
            scores = scores.float()
        if self.penalty_type == "log_barrier":
            loss = loss + self.penalty_weight * self.log_barrier_penalty(scores, lower_bound=-5, upper_bound=5)
        elif self.penalty_type == "L2":
            loss = loss + self.penalty_weight * self.l2_penalty(scores)
        elif self.penalty_type != "none":
            raise ConfigError(f"penalty_type must be 'log_barrier', 'L2' or 'none', got {self.penalty_type!r}")

        n = torch.tensor(float(len(chosen)), device=hidden_states.device)
        out = {
            "loss": loss,
            "reduced_loss": reduce_mean(loss.detach()),
            "acc": reduce_mean((chosen > rejected).sum().detach() / n),
            "chosen_score_mean": reduce_mean(chosen.mean().detach()),
            "rejected_score_mean": reduce_mean(rejected.mean().detach()),
            "num_samples": reduce_sum(n.detach()),
            "num_tokens": reduce_sum(torch.tensor(float(labels.shape[1]), device=hidden_states.device)),
        }
        # The terms are logged by names without "loss": mmengine sums every
        # logged value whose name contains it into the loss it steps on.
        if settings.center_rewards_coefficient:
            out["ranking_term"] = reduce_mean(terms["ranking"].detach())
            out["center_term"] = reduce_mean(terms["center"].detach())
        if settings.margin and margins is not None:
            out["margin_mean"] = reduce_mean(margins.float().mean().detach())
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"non-finite reward loss ({loss.item()}); chosen score mean "
                f"{out['chosen_score_mean'].item()}, rejected {out['rejected_score_mean'].item()}. "
                "Under fp16 this is usually an overflow: train in bf16 (configs/deepspeed/polar_zero*.json "
                "pick it where the GPU has it), set loss_in_fp32 = True, or lower the learning rate."
            )
        return out

    def _shared_prefix_scores(self, data, shared):
        """(chosen, rejected, hidden states) of a shared-prefix row (:mod:`polar_xtuner.encoding.shared_prefix`).

        Each candidate is scored once at its reward token; a candidate in
        several pairs gives its one score to each. :meth:`layout_of` refused
        the row already where it cannot be shared (sequence parallel, no varlen).
        """
        shared = shared.to(data["input_ids"].device)
        hidden_states = self.llm(**data)[0]  # under forward's SharedPrefix layout
        scores = self.v_head(hidden_states)[0, shared.score_index, 0]
        return scores[shared.pairs[:, 0]], scores[shared.pairs[:, 1]], hidden_states

    # xtuner passes avg_factor = mean over ranks of 1/pairs; the mean over this row's scores here.
    def log_barrier_penalty(self, logits, lower_bound, upper_bound, epsilon=1e-3, avg_factor=1):
        # logits holds the chosen then the rejected scores: two per pair
        return super().log_barrier_penalty(logits, lower_bound, upper_bound, epsilon, 2.0 / len(logits))

    def l2_penalty(self, logits, avg_factor=1):
        return super().l2_penalty(logits, 2.0 / len(logits))

    @staticmethod
    def _prepare_for_flash_attn(cfg, llm_cfg):
        requested = getattr(cfg, "attn_implementation", None)
        if requested == "flash_attention_2" and not flash_attn_available():
            raise ConfigError(
                "the config asks for attn_implementation='flash_attention_2' but flash-attn is not "
                "importable on this machine; install flash-attn on a GPU, or remove "
                "attn_implementation from model.llm to use PyTorch SDPA"
            )
        if requested is None:
            cfg.attn_implementation = "flash_attention_2" if flash_attn_available() else "sdpa"
        if cfg.attn_implementation == "flash_attention_2":
            cfg.torch_dtype = training_dtype()
        elif not torch.cuda.is_available():
            cfg.torch_dtype = torch.float32
        print_log(
            f"PolarRewardModel: attn_implementation={cfg.attn_implementation}, "
            f"dtype={getattr(cfg, 'torch_dtype', 'from checkpoint')}",
            "current",
        )
        return cfg
