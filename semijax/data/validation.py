"""Up-front checks of a run's data, so that a bad file is named before anything is written.

`check_data` reads the sources of a `SemiSupervisedData`:

- labeled and val records are read in full (decoded, sizes compared, label values checked
  by the sources themselves), so a corrupt or truncated file, a label map whose size differs
  from its image and out-of-range label values all raise `DataError` naming the file;
- unlabeled images (usually most of the data) are checked cheaply with `check_image_file`:
  the header is parsed and the end of a PNG/JPEG must be there (`IEND` / `EOI`), which
  catches missing, non-image and truncated files without decoding the pixels. Anything that
  looks wrong is decoded in full before it is reported, so a valid file is never refused.
  `full=True` (the train command's `--check`) decodes every unlabeled record as well.

Reads run in a thread pool (PIL decodes without the GIL); the first bad record in source
order is reported, so the message is the same however many threads ran. Label values outside
the classes are the exception: every record is read and one message lists which files hold
which bad values, with the valid ids (`LabelValueError`s gathered by `label_value_report`).
"""

import concurrent.futures
import os
from typing import Optional

from semijax.data import image_io
from semijax.data.sources import ArraySource, DataError, FileSource, LabelValueError, list_problems

_PNG_END = b"IEND"
_JPEG_END = b"\xff\xd9"
_TAIL = 64  # bytes searched for the end marker (JPEGs may carry a few bytes of padding)


def _threads(workers: Optional[int]) -> int:
  return max(1, min(16, workers or (os.cpu_count() or 1)))


def check_image_file(path: str) -> tuple:
  """Cheap completeness check of an image file; returns its `(width, height)`.

  Raises:
    DataError: the file is missing, not an image, or truncated (named).
  """
  size = image_io.image_size(path)  # header; raises DataError naming the file
  ext = os.path.splitext(path)[1].lower()
  marker = {".png": _PNG_END, ".jpg": _JPEG_END, ".jpeg": _JPEG_END}.get(ext)
  complete = False
  if marker is not None:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - _TAIL))
      complete = marker in f.read()
  if not complete:  # other formats, or a suspicious tail: decode to be sure
    image_io.read_image(path)
  return size


def _read_record(source, i: int) -> Optional[LabelValueError]:
  """Reads record `i`; returns (not raises) a `LabelValueError` so that all can be listed."""
  try:
    source[i]  # pylint: disable=pointless-statement
  except LabelValueError as e:
    return e
  return None


def label_value_report(errors, source=None, *, limit: int = 10) -> str:
  """One message for the `LabelValueError`s of several files: each bad value with its files.

  Args:
    errors: `LabelValueError`s (one per file) in source order.
    source: the source they come from; its `explain_values` (or `info`) names the valid ids.
    limit: files named per value before a count.

  Returns:
    e.g. `label values outside the classes in 3 files: 255 in masks/a.png, masks/b.png; 7 in
    masks/c.png. Valid label ids: 0 sky, 1 grass, 2 sand; ...`
  """
  by_value = {}
  for e in errors:
    for v in e.values:
      by_value.setdefault(v, []).append(e.path)
  listed = "; ".join(f"{v} in {len(paths)} file{'s' if len(paths) > 1 else ''} "
                     f"({list_problems(paths, limit)})" for v, paths in sorted(by_value.items()))
  bad = sorted(by_value)
  if source is not None and hasattr(source, "explain_values"):
    explain = source.explain_values(bad)
  elif source is not None:
    info = source.info
    explain = (f"valid label ids: {info.describe_classes()}; ignore: {info.ignore_index}")
  else:
    explain = ""
  return (f"label values outside the classes in {len(errors)} file"
          f"{'s' if len(errors) > 1 else ''}: {listed}" + (f". {explain}" if explain else ""))


def _quick(source, i: int) -> None:
  item = source.items[i]
  check_image_file(item.image)


def _run(fn, source, name: str, workers: Optional[int]) -> int:
  n = len(source)
  if n == 0:
    return 0
  threads = _threads(workers)
  if threads == 1 or n < 8:
    found = [fn(source, i) for i in range(n)]
  else:
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=f"check-{name}") as ex:
      # `map` yields in order and re-raises at the first failing index.
      found = list(ex.map(lambda i: fn(source, i), range(n)))
  label_errors = [e for e in found if e is not None]
  if len(label_errors) == 1:
    raise label_errors[0]
  if label_errors:
    raise LabelValueError(f"{name} set: {label_value_report(label_errors, source)}",
                          label_errors[0].path, sorted({v for e in label_errors for v in e.values}))
  return n


def check_source(source, name: str, *, full: bool = True, workers: Optional[int] = None) -> int:
  """Reads (`full`) or quickly checks every record of `source`; returns the number checked.

  Raises:
    DataError: the first bad record, naming its file.
  """
  if source is None:
    return 0
  if not len(source):
    raise DataError(f"{source!r}: the {name} set is empty")
  if full:
    return _run(_read_record, source, name, workers)
  if isinstance(source, FileSource):
    return _run(_quick, source, name, workers)
  if isinstance(source, ArraySource):
    return len(source)  # in memory, checked at construction
  # Other sources (packed records): the first and last records stand for the rest.
  _read_record(source, 0)
  _read_record(source, len(source) - 1)
  return 2


def check_data(data, *, full: bool = False, workers: Optional[int] = None) -> dict:
  """Checks the labeled, unlabeled and val sources of `data` (see the module docstring).

  Args:
    data: a `datasets.SemiSupervisedData`.
    full: decode every unlabeled record too.
    workers: reader threads (default: the CPU count, at most 16).

  Returns:
    `{name: records checked}`.

  Raises:
    DataError: naming the first bad file (or an empty labeled/val set).
  """
  out = {"labeled": check_source(data.labeled, "labeled", workers=workers),
         "val": check_source(data.val, "val", workers=workers)}
  if data.unlabeled is not None and len(data.unlabeled):
    out["unlabeled"] = check_source(data.unlabeled, "unlabeled", full=full, workers=workers)
  return out
