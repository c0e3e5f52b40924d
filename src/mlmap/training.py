"""Training: a jitted step that skips non-finite updates, and a resumable fit loop.

``make_train_step`` (``_step.py``) works with plain optax optimizers and with
mlmap's second-order ones (which receive the batch as ``batch=(inputs,
targets)``). ``fit`` (``_fit.py``) runs epochs of minibatches with a tqdm
progress bar and checkpoints atomically, so that a resumed run continues
bit-for-bit. Checkpoints are written by :func:`mlmap.save_checkpoint`
(``_checkpoint.py``: no pickle, atomic, checked on load).
"""

from mlmap._checkpoint import load_checkpoint, save_checkpoint
from mlmap._fit import (CHECKPOINT_NAME, FitResult, StopTraining, fit, num_and_batch_size,
                        resume_parts)
from mlmap._step import make_train_step

__all__ = ["CHECKPOINT_NAME", "FitResult", "StopTraining", "fit", "load_checkpoint",
           "make_train_step", "num_and_batch_size", "resume_parts", "save_checkpoint"]
