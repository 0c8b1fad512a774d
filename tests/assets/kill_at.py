"""A hook that SIGKILLs its own training process after a given iteration.

The resume test adds it to a copied config (with tests/assets on PYTHONPATH)
to crash a run at a known step, as a node failure or an OOM kill would.
"""
import os
import signal

from mmengine.hooks import Hook


class KillAt(Hook):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
