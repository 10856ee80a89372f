"""Ready-made click-through-rate models on :class:`~lightning_bagpipe.CachedEmbedding`: DeepFM and DLRM.

Both are LightningModules taking :class:`~lightning_bagpipe.Batch` objects; train them with
``Trainer(strategy="bagpipe")`` and a :class:`~lightning_bagpipe.BagpipeDataModule`. They log ``train_loss``,
``val_auc``/``val_logloss`` and ``test_auc``/``test_logloss``; ``predict`` returns click probabilities.
"""

from lightning_bagpipe.models.common import ClickModel, mlp
from lightning_bagpipe.models.deepfm import DeepFM, fm_second_order
from lightning_bagpipe.models.dlrm import DLRM, pairwise_dot_interactions

__all__ = ["DLRM", "ClickModel", "DeepFM", "fm_second_order", "mlp", "pairwise_dot_interactions"]
