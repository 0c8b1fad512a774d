"""An mmengine hook that measures preference accuracy during training.

``PolarEvalHook`` scores a validation file with the model being trained, every
``interval`` iterations and at the end, with the same encoding and scorer as
``tools/eval_pref.py``, and logs ``val/pref_accuracy`` (and the mean margin) to
the runner's visualizer (TensorBoard in the configs) and the log.

Every rank runs the same evaluation, so ZeRO-3's collective parameter gathers
stay in step; rank 0 logs.
"""

from __future__ import annotations

import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.logging import print_log

from polar_xtuner.data.dataset import build_tokenizer
from polar_xtuner.encoding import EncodingSettings, PolarEncoder
from polar_xtuner.encoding.shared_prefix import group_pairs, pack_groups, rows_by_length, spread_scores
from polar_xtuner.errors import renamed_setting
from polar_xtuner.eval.metrics import accuracy, mean_margin, unflatten
from polar_xtuner.records import load_records, require_regular_file
from polar_xtuner.scoring.local import pad_id, score_ids
from polar_xtuner.train.attention import shared_prefix_backend
from polar_xtuner.train.layout import WHOLE, SharedPrefix, row_layout


class PolarEvalHook(Hook):
    """Preference accuracy on a validation file during training.

    Args:
        data_files: Validation .jsonl (prompt/reference/chosen/rejected).
        tokenizer: The tokenizer or its config dict.
        interval: Evaluate every this many iterations (and after training).
        max_length: Token budget, as in training (None: the lengths saved in
            the tokenizer's model directory, else POLAR's defaults).
        max_response_length: Response cap, as in training (None: likewise).
        batch_size: Sequences per forward pass.
        shared_prefix: Score the answers of one prompt and reference after one
            copy of their prefix, rows of groups through the model's own
            shared-prefix attention (a varlen model; a padded one scores
            whole sequences). The scores equal the unshared ones within
            float rounding.
        row_tokens: Tokens of a shared-prefix row (a longer group gets its own).
        share_prefix: ``shared_prefix`` under its earlier name (configs
            written before the rename).
    """

    # After the step's other hooks. Evaluation does not depend on the order: its
    # forwards declare their own layout (padded rows, or its shared-prefix rows).
    priority = "LOW"

    def __init__(self, data_files, tokenizer, interval: int = 500, max_length: int | None = None,
                 max_response_length: int | None = None, batch_size: int = 16, shared_prefix: bool | None = None,
                 row_tokens: int = 8192, share_prefix: bool | None = None):
        self.data_files = data_files
        self.tokenizer = tokenizer
        self.interval = interval
        self.max_length = max_length
        self.max_response_length = max_response_length
        self.batch_size = batch_size
        self.shared_prefix = renamed_setting("shared_prefix", shared_prefix, "share_prefix", share_prefix, False)
        self.row_tokens = row_tokens
        self._ids = None
        self._groups = None
        self.history: list[tuple[int, float]] = []

    def before_train(self, runner) -> None:
        # Validate and encode once: a bad val file fails before training starts. Every rank reads
        # it, so a pipe would be split between them: files only.
        for path in [self.data_files] if isinstance(self.data_files, str) else list(self.data_files):
            require_regular_file(path, "every rank reads the validation file")
        records = load_records(self.data_files)
        tok = build_tokenizer(self.tokenizer)
        model_dir = getattr(tok, "name_or_path", None)
        settings = EncodingSettings.from_model_dir(model_dir if model_dir and os.path.isdir(model_dir) else None)
        settings = settings.override(self.max_length, self.max_response_length)
        encoder = PolarEncoder(tok, settings.max_length, settings.max_response_length)
        self._pad = pad_id(tok)
        if self.shared_prefix:
            # the groups rebuild every whole sequence: the val file is encoded once either way
            self._groups, self._where = group_pairs(records, encoder)
            self._ids = [self._groups[g].sequence(k) for g, i, j in self._where for k in (i, j)]
        else:
            feats = encoder.encode_pairs(records)
            self._ids = [f[k] for f in feats for k in ("chosen_ids", "rejected_ids")]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            self.evaluate(runner, runner.iter + 1)  # runner.iter counts from 0 until the step ends

    def after_train(self, runner) -> None:
        if not self.history or self.history[-1][0] != runner.iter:
            self.evaluate(runner, runner.iter)

    @torch.no_grad()
    def evaluate(self, runner, step: int) -> float:
        """Score the val file with the current weights; log and return the accuracy."""
        model = runner.model
        while hasattr(model, "module"):  # DeepSpeed / DDP wrappers
            model = model.module
        was_training = model.training
        model.eval()
        try:
            if self._groups is not None and getattr(model, "use_varlen_attn", False):
                scores = score_shared_rows(model, self._groups, self.row_tokens)
                pairs = [(scores[g][i], scores[g][j]) for g, i, j in self._where]
            else:
                with row_layout(WHOLE):  # padded batches: each row one sequence
                    pairs = unflatten(score_ids(model, self._ids, self._pad, "right", self.batch_size))
        finally:
            model.train(was_training)
        acc, margin = accuracy(pairs), mean_margin(pairs)
        self.history.append((step, acc))
        if get_rank() == 0:
            runner.visualizer.add_scalars({"val/pref_accuracy": acc, "val/margin": margin}, step=step)
            print_log(f"PolarEvalHook: iter {step} val/pref_accuracy {acc:.4f} "
                      f"margin {margin:.4f} (n={len(pairs)})", "current")
        return acc


@torch.no_grad()
def score_shared_rows(model, groups, row_tokens: int) -> list[list[float]]:
    """Each group's candidate scores from the training model, rows of groups through its shared-prefix attention.

    ``model`` is a ``PolarRewardModel`` with varlen attention (its patched
    attention reads the row's layout, given here); one row per forward pass.
    """
    device = next(model.parameters()).device
    backend = shared_prefix_backend(getattr(model, "shared_prefix_attn_backend", None), device)
    out: list[list[float]] = [[] for _ in groups]
    for members in rows_by_length(groups, row_tokens):
        row = pack_groups([groups[i] for i in members]).to(device)
        with row_layout(SharedPrefix(row.group_ids, row.member_ids, backend)):
            hidden = model.llm(input_ids=row.input_ids[None], position_ids=row.position_ids[None])[0]
        spread_scores(model.v_head(hidden[0, row.score_index]).squeeze(-1).float().tolist(), members, groups, out)
    return out
