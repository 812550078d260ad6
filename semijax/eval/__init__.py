"""Evaluation: confusion-matrix metrics and the whole / centre-crop / sliding-window protocols."""

from semijax.eval.inference import (
    MODES,
    center_crop,
    default_stride,
    evaluate,
    make_protocol,
    predict_center_crop,
    predict_sliding_window,
    predict_whole,
    sliding_window_starts,
)
from semijax.eval.metrics import (
    ConfusionAccumulator,
    accumulate,
    confusion_matrix,
    init_accumulator,
    iou_from_confusion,
    read_accumulator,
    zeros_accumulator,
)

__all__ = [
  "MODES", "ConfusionAccumulator", "accumulate", "center_crop", "confusion_matrix",
  "default_stride", "evaluate", "init_accumulator", "iou_from_confusion", "make_protocol",
  "predict_center_crop", "predict_sliding_window", "predict_whole", "read_accumulator",
  "sliding_window_starts", "zeros_accumulator",
]
