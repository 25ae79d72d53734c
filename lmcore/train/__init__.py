"""Training a TransformerLM (chapter 3): loss, optimizer, schedule, batches, loop, checkpoints.

Command line: ``python -m lmcore.train --config FILE [--set key=value ...]`` runs the whole
pipeline (corpus, tokenizer, tokens, training, samples); see :mod:`lmcore.train.pipeline`.
"""

from lmcore.train.batches import get_batch, load_tokens
from lmcore.train.checkpoint import load_checkpoint, save_checkpoint
from lmcore.train.functional import chunked_cross_entropy, clip_grad_norm, cosine_lr, cross_entropy
from lmcore.train.loop import TrainConfig, TrainResult, configure_optimizer, evaluate, train
from lmcore.train.metrics import MetricsLog, plot_metrics, read_metrics
from lmcore.train.optim import AdamW

__all__ = [
    "AdamW", "MetricsLog", "TrainConfig", "TrainResult", "clip_grad_norm", "configure_optimizer", "cosine_lr",
    "chunked_cross_entropy", "cross_entropy", "evaluate", "get_batch", "load_checkpoint", "load_tokens",
    "plot_metrics", "read_metrics",
    "save_checkpoint", "train",
]
