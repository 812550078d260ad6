"""Evaluation protocols (whole image, centre crop, sliding window) and the eval loop.

The protocol changes reported mIoU by several points (U2PL #26: ~75 centre crop during
training vs 79.1 sliding window; CCVC #9: ~2 points on Cityscapes), so `evaluate` returns
the protocol with every number, e.g. `mode='sliding_window(801x801, stride 534)'`.

Every function takes `logits_fn(images [B, h, w, 3]) -> logits [B, h, w, C]` that already
returns logits at its input resolution (the reference code bilinearly upsamples with
`align_corners=True`: `ops.resize_bilinear`). Window and crop positions are computed in
Python from static shapes, so everything is jit-compatible; images are normalised before
they get here, so a pad value of 0 is the mean colour, as in the reference code.
"""

import dataclasses
import functools
import warnings
import weakref
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semijax import ops
from semijax.eval import metrics

MODES = ("whole", "center_crop", "sliding_window")
COMBINES = ("logits", "softmax")

Size = Union[int, Sequence[int]]
LogitsFn = Callable[[jax.Array], jax.Array]


def _pair(size: Size, name: str) -> Tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    size = (size, size)
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"{name} must be a positive int or (h, w), got {size}")
  return size


def default_stride(window: Size) -> Tuple[int, int]:
  """`ceil(2/3 * window)` per axis (DGCL/U2PL `eval.py`); 534 for both 800 and 801."""
  return tuple(-(-2 * w // 3) for w in _pair(window, "window"))


def sliding_window_starts(size: int, window: int, stride: int) -> List[int]:
  """Start offsets of windows along one axis of length `size >= window`.

  Starts are `0, stride, 2 * stride, ...`, with the last one moved back to
  `size - window` so that every window lies inside the image and the last touches the far
  edge (DGCL/U2PL and mmseg's `slide_inference`). E.g. 2048 / 801 / 534 gives
  `[0, 534, 1068, 1247]` and 1024 / 801 / 534 gives `[0, 223]`.
  """
  if size < window:
    raise ValueError(f"size {size} < window {window}: pad the image first")
  if not 1 <= stride <= window:
    raise ValueError(f"stride must be in [1, window={window}] to cover the image, got {stride}")
  n = -(-(size - window) // stride) + 1
  return [min(i * stride, size - window) for i in range(n)]


def _centered_pad(n: int, target: int) -> Tuple[int, int]:
  """(before, after) padding of a length-n axis to at least `target`, centred as DGCL/U2PL."""
  total = max(target - n, 0)
  return total // 2, total - total // 2


def _check_logits(logits: jax.Array, images: jax.Array) -> jax.Array:
  if logits.ndim != 4 or logits.shape[:3] != images.shape[:3]:
    raise ValueError(
        f"logits_fn must map images {images.shape} to logits [B, h, w, C] at the input "
        f"resolution (upsample with ops.resize_bilinear), got {logits.shape}")
  return logits


def predict_whole(logits_fn: LogitsFn, images: jax.typing.ArrayLike) -> jax.Array:
  """Whole-image inference: one `logits_fn` call at the original resolution.

  The VOC protocol of UniMatch/DSSN (`original`), CAC and the CPS-style codebases.

  Args:
    logits_fn: `[B, H, W, 3] -> [B, H, W, C]`.
    images: `[B, H, W, 3]` float.

  Returns:
    `[B, H, W, C]` logits, as `logits_fn` returns them.
  """
  images = jnp.asarray(images)
  return _check_logits(logits_fn(images), images)


def center_crop(images: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, crop: Size, *,
                ignore_index: int = ops.IGNORE_INDEX,
                pad_value: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """The centre `crop` of images and labels, padding axes shorter than the crop.

  As DGCL/U2PL's `Crop(crop_type='center')`: an axis shorter than the crop is padded
  (image with `pad_value`, label with `ignore_index`), `(crop - n) // 2` before and the
  rest after; then the window starting at `(n' - crop) // 2` is taken.

  Args:
    images: `[B, H, W, 3]`.
    labels: `[B, H, W]` int.
    crop: static int or `(h, w)`.
    ignore_index: label value for padded pixels.
    pad_value: image value for padded pixels.

  Returns:
    images `[B, h, w, 3]` and labels `[B, h, w]` (int32).
  """
  images = jnp.asarray(images)
  labels = jnp.asarray(labels).astype(jnp.int32)
  (ch, cw), (_, h, w, _) = _pair(crop, "crop"), images.shape
  pad_h, pad_w = _centered_pad(h, ch), _centered_pad(w, cw)
  images = jnp.pad(images, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=pad_value)
  labels = jnp.pad(labels, ((0, 0), pad_h, pad_w), constant_values=ignore_index)
  top, left = (images.shape[1] - ch) // 2, (images.shape[2] - cw) // 2
  return (images[:, top:top + ch, left:left + cw], labels[:, top:top + ch, left:left + cw])


def predict_center_crop(logits_fn: LogitsFn, images: jax.typing.ArrayLike,
                        labels: jax.typing.ArrayLike, crop: Size, *,
                        ignore_index: int = ops.IGNORE_INDEX,
                        pad_value: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Centre-crop inference: the in-training validation of DGCL/U2PL and UniMatch.

  DGCL uses crop 513 on VOC (images are at most 500 px, so this is the whole image padded
  with ignore) and 800 on Cityscapes; it scores only the crop, so on Cityscapes it is
  below the final sliding-window number (U2PL #26). Note: U2PL's own `Crop` (snapshot
  53bbdd2) overrides the label pad value with 0, so its VOC numbers count the padding as
  background pixels; DGCL pads with ignore, as here.

  Args:
    logits_fn: `[B, h, w, 3] -> [B, h, w, C]`.
    images: `[B, H, W, 3]` float.
    labels: `[B, H, W]` int.
    crop: static int or `(h, w)`.
    ignore_index: label of padded pixels.
    pad_value: image value of padded pixels.

  Returns:
    logits `[B, h, w, C]` and the matching labels `[B, h, w]` int32.
  """
  images, labels = center_crop(images, labels, crop, ignore_index=ignore_index,
                               pad_value=pad_value)
  return _check_logits(logits_fn(images), images), labels


def predict_sliding_window(logits_fn: LogitsFn, images: jax.typing.ArrayLike, *,
                           window: Size, stride: Optional[Size] = None, num_classes: int,
                           windows_per_call: int = 1, pad_value: float = 0.0,
                           combine: str = "logits") -> jax.Array:
  """Sliding-window inference with overlapping windows averaged.

  The image is padded (centred, with `pad_value`) to at least `window`, covered by
  windows at the static offsets of `sliding_window_starts`, and each pixel gets the mean
  of the outputs of the windows covering it (sum / count); the padding is then cropped.
  The windows run inside a `lax.scan`, `windows_per_call` of them stacked along the batch
  in each `logits_fn` call (more is faster, needs more memory); `logits_fn` is traced once.

  Relation to the reference code:
    * DGCL / U2PL `eval.py` (Cityscapes final numbers): window 800, stride
      `ceil(800 * 2/3) = 534`, centred zero padding when smaller, logits averaged. This is
      `window=800` with the defaults (their extra resize to a 2048 long side is the
      identity on Cityscapes).
    * UniMatch / DSSN (`sliding_window`, Cityscapes): window 801, stride
      `int(801 * 2/3) = 534`, windows start at 0, 534, 1068, ... and are *clipped* at the
      border (edge windows are smaller, e.g. 446 px wide, instead of being moved back), and
      softmax probabilities are summed without dividing by the count. The missing division
      never changes the argmax, but averaging probabilities instead of logits can flip it
      in overlaps; `combine='softmax'` reproduces the probability averaging.
      The smaller edge windows are not reproduced (they would need one compiled shape per
      window); near the right and bottom edges the network then sees more context here.

  Args:
    logits_fn: `[N, h, w, 3] -> [N, h, w, C]` at the window resolution.
    images: `[B, H, W, 3]` float.
    window: static int or `(h, w)` window size.
    stride: static int or `(h, w)`, at most the window; default `ceil(2/3 * window)`.
    num_classes: C, the channels `logits_fn` returns.
    windows_per_call: windows stacked in one `logits_fn` call (batch `windows_per_call * B`).
    pad_value: image value used to pad images smaller than the window.
    combine: `'logits'` averages logits (DGCL); `'softmax'` averages probabilities
      (UniMatch/DSSN).

  Returns:
    `[B, H, W, C]` float32 averaged logits (probabilities when `combine='softmax'`).
  """
  if combine not in COMBINES:
    raise ValueError(f"combine={combine!r}; expected one of {COMBINES}")
  images = jnp.asarray(images)
  batch, h, w, _ = images.shape
  wh, ww = _pair(window, "window")
  sh, sw = default_stride(window) if stride is None else _pair(stride, "stride")
  pad_h, pad_w = _centered_pad(h, wh), _centered_pad(w, ww)
  padded = jnp.pad(images, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=pad_value)
  hp, wp = padded.shape[1:3]
  starts = [(y, x) for y in sliding_window_starts(hp, wh, sh)
            for x in sliding_window_starts(wp, ww, sw)]

  # Static coverage count; dummy windows that round the count up to a multiple of
  # `windows_per_call` repeat the first position with weight 0.
  count = np.zeros((hp, wp), np.float32)
  for y, x in starts:
    count[y:y + wh, x:x + ww] += 1
  k = max(1, min(int(windows_per_call), len(starts)))
  num_groups = -(-len(starts) // k)
  extra = num_groups * k - len(starts)
  positions = np.asarray(starts + starts[:1] * extra, np.int32).reshape(num_groups, k, 2)
  weights = np.asarray([1.0] * len(starts) + [0.0] * extra, np.float32).reshape(num_groups, k)

  def body(acc, group):
    pos, weight = group
    crops = [lax.dynamic_slice(padded, (0, pos[j, 0], pos[j, 1], 0),
                               (batch, wh, ww, padded.shape[3])) for j in range(k)]
    crops = jnp.concatenate(crops, axis=0)
    out = _check_logits(logits_fn(crops), crops)
    if out.shape[-1] != num_classes:
      raise ValueError(f"logits_fn returned {out.shape[-1]} channels, num_classes={num_classes}")
    out = out.astype(jnp.float32)
    if combine == "softmax":
      out = jax.nn.softmax(out, axis=-1)
    for j in range(k):
      start = (0, pos[j, 0], pos[j, 1], 0)
      part = jnp.where(weight[j] > 0, out[j * batch:(j + 1) * batch], 0.0)
      acc = lax.dynamic_update_slice(
          acc, lax.dynamic_slice(acc, start, part.shape) + part, start)
    return acc, None

  acc = jnp.zeros((batch, hp, wp, num_classes), jnp.float32)
  acc, _ = lax.scan(body, acc, (jnp.asarray(positions), jnp.asarray(weights)))
  acc = acc / jnp.asarray(count)[None, :, :, None]
  return acc[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w]


# ----------------------------------------------------------------------------------------
# The evaluation loop.


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A fully specified, hashable evaluation protocol; `str()` is the recorded `mode`."""
  mode: str
  window: Optional[Tuple[int, int]] = None
  stride: Optional[Tuple[int, int]] = None
  crop: Optional[Tuple[int, int]] = None
  windows_per_call: int = 1
  pad_value: float = 0.0
  combine: str = "logits"

  def __str__(self) -> str:
    # Only settings that can change the numbers (not windows_per_call).
    pad = f", pad {self.pad_value:g}" if self.pad_value else ""
    if self.mode == "center_crop":
      return f"center_crop({self.crop[0]}x{self.crop[1]}{pad})"
    if self.mode == "sliding_window":
      sh, sw = self.stride
      stride = f"{sh}" if sh == sw else f"{sh}x{sw}"
      softmax = ", softmax" if self.combine == "softmax" else ""
      return (f"sliding_window({self.window[0]}x{self.window[1]}, stride {stride}"
              f"{softmax}{pad})")
    return self.mode


def make_protocol(mode: str, *, window: Optional[Size] = None, stride: Optional[Size] = None,
                  crop: Optional[Size] = None, windows_per_call: int = 1,
                  pad_value: float = 0.0, combine: str = "logits") -> Protocol:
  """Validates the arguments of `evaluate` into a `Protocol` (raises ValueError)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if mode == "center_crop":
    if crop is None:
      raise ValueError("mode='center_crop' needs crop=")
    return Protocol(mode, crop=_pair(crop, "crop"), pad_value=float(pad_value))
  if mode == "sliding_window":
    if window is None:
      raise ValueError("mode='sliding_window' needs window=")
    if combine not in COMBINES:
      raise ValueError(f"combine={combine!r}; expected one of {COMBINES}")
    window = _pair(window, "window")
    stride = default_stride(window) if stride is None else _pair(stride, "stride")
    if stride[0] > window[0] or stride[1] > window[1]:
      raise ValueError(f"stride {stride} larger than window {window} leaves gaps")
    return Protocol(mode, window=window, stride=stride, windows_per_call=int(windows_per_call),
                    pad_value=float(pad_value), combine=combine)
  return Protocol(mode)


# Compiled eval steps per logits_fn (weakly held) and protocol; each jit caches one
# executable per input shape. Reused across `evaluate` calls with the same function object.
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _eval_step(logits_fn: LogitsFn, protocol: Protocol, num_classes: int, ignore_index: int):
  try:
    per_fn = _STEPS.setdefault(logits_fn, {})
    # Held weakly so that the cached step does not keep its own cache key alive.
    fn_ref = weakref.ref(logits_fn)
  except TypeError:  # Not hashable or not weakly referenceable: compile for this call only.
    per_fn, fn_ref = {}, lambda: logits_fn
  key = (protocol, num_classes, ignore_index)
  if key not in per_fn:
    def step(acc, variables, images, labels, valid):
      fn = fn_ref()
      fn = fn if variables is None else functools.partial(fn, variables)
      labels = jnp.asarray(labels).astype(jnp.int32)
      if protocol.mode == "whole":
        logits = predict_whole(fn, images)
      elif protocol.mode == "center_crop":
        logits, labels = predict_center_crop(fn, images, labels, protocol.crop,
                                             ignore_index=ignore_index,
                                             pad_value=protocol.pad_value)
      else:
        logits = predict_sliding_window(
            fn, images, window=protocol.window, stride=protocol.stride,
            num_classes=num_classes, windows_per_call=protocol.windows_per_call,
            pad_value=protocol.pad_value, combine=protocol.combine)
      preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      cm = metrics.confusion_matrix(preds, labels, num_classes, ignore_index=ignore_index,
                                    valid=valid)
      # Labelled pixels outside [0, C): a wrong label encoding (e.g. Cityscapes labelIds
      # instead of trainIds) would otherwise be silently skipped.
      pixel_valid = metrics._pixel_mask(valid, labels.shape)
      unknown = jnp.sum(pixel_valid & (labels != ignore_index)
                        & ((labels < 0) | (labels >= num_classes)), dtype=jnp.int32)
      counts = jnp.concatenate([cm.reshape(-1), unknown[None],
                                jnp.sum(jnp.asarray(valid, jnp.int32))[None]])
      return metrics.accumulate(acc, counts)

    per_fn[key] = jax.jit(step, donate_argnums=0)
  return per_fn[key]


def evaluate(logits_fn: Callable, batches: Iterable[dict], num_classes: int, *, mode: str,
             window: Optional[Size] = None, stride: Optional[Size] = None,
             crop: Optional[Size] = None, ignore_index: int = ops.IGNORE_INDEX,
             windows_per_call: int = 1, pad_value: float = 0.0, combine: str = "logits",
             variables=None) -> dict:
  """mIoU of `logits_fn` over `batches` under one evaluation protocol.

  Each batch runs through one jitted step (inference, argmax, confusion matrix, on-device
  accumulation); nothing is fetched until the end. Batches may differ in shape (one
  compiled executable per shape). Padded examples (`valid` False) are run but not counted.

  Args:
    logits_fn: `logits_fn(images) -> logits`, or `logits_fn(variables, images)` when
      `variables` is given; logits at the input resolution, `[B, h, w, C]`.
    batches: iterable of dicts with `image` float `[B, H, W, 3]`, `label` int `[B, H, W]`
      and optionally `valid` bool `[B]` (default all True).
    num_classes: C.
    mode: one of `MODES`: `whole`, `center_crop` (needs `crop`) or `sliding_window` (needs
      `window`; `stride` defaults to `ceil(2/3 * window)`).
    window, stride, crop, windows_per_call, pad_value, combine: protocol settings, see
      `predict_sliding_window` and `predict_center_crop`.
    ignore_index: label value that never counts.
    variables: optional pytree (e.g. `{'params': ..., 'batch_stats': ...}`) passed to the
      compiled step as an argument rather than baked in as constants: with the same
      `logits_fn` object (e.g. `model.apply` bound once, or a module-level function), a
      later call with new variables reuses the compiled step.

  Returns:
    `iou_from_confusion`'s dict plus `mode` (the protocol as a string, e.g.
    `'sliding_window(801x801, stride 534)'`), `confusion_matrix` (`[C, C]` int64),
    `num_images` (valid examples) and `num_unknown_label_pixels` (labelled pixels outside
    `[0, C)`, skipped; a warning is raised when non-zero).
  """
  protocol = make_protocol(mode, window=window, stride=stride, crop=crop,
                           windows_per_call=windows_per_call, pad_value=pad_value,
                           combine=combine)
  step = _eval_step(logits_fn, protocol, num_classes, ignore_index)
  c2 = num_classes * num_classes
  acc = metrics.zeros_accumulator((c2 + 2,))
  for batch in batches:
    images, labels = batch["image"], batch["label"]
    valid = batch.get("valid")
    if valid is None:
      valid = np.ones((np.shape(images)[0],), bool)
    acc = step(acc, variables, images, labels, valid)
  counts = metrics.read_accumulator(acc)
  cm = counts[:c2].reshape(num_classes, num_classes)
  result = metrics.iou_from_confusion(cm)
  result.update(mode=str(protocol), confusion_matrix=cm, num_images=int(counts[c2 + 1]),
                num_unknown_label_pixels=int(counts[c2]))
  if counts[c2]:
    warnings.warn(f"{counts[c2]} labelled pixels have labels outside [0, {num_classes}) and "
                  f"were not counted (ignore_index={ignore_index}); check the label encoding "
                  "(e.g. Cityscapes *_labelTrainIds.png, not *_labelIds.png).", stacklevel=2)
  return result
