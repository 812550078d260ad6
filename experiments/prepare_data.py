r"""Checks (and optionally fixes or packs) a dataset folder before anyone trains on it.

    python -m experiments.prepare_data voc --root data/VOC2012 [--fix --sbd SBD_DIR]
    python -m experiments.prepare_data cityscapes --root data/cityscapes [--fix]
    python -m experiments.prepare_data folder --root data/my_set [--fraction 1/8 --seed 0]
    python -m experiments.prepare_data example --root data/textures   # writes a 3-class example

Reports, per dataset: file counts per split against the expected ones; every split list of the
registry with its labeled/unlabeled counts and the files it needs that are missing (the first
`--max-listed` named, plus a count); a decode pass over a sample of records (all with `--full`):
unreadable files, image/label size mismatches, label values outside the classes, and a histogram
of the label values found; and, for each problem, the command that fixes it. `--fix` runs the
converters (SBD `.mat` -> SegmentationClassAug PNGs, Cityscapes labelIds -> labelTrainIds) for the
missing files and checks again. `--to-array-record DIR` packs the checked dataset into array_record
files (tensorflow-datasets format, no TensorFlow) for `semijax.data.sources.PackedSource`.
For a custom folder it also states the valid label ids, the ignore value and the background
class, lists which mask files hold which invalid values, and warns when there is no val set.
`example` writes a generated 3-class folder (`semijax.data.example_folder`) to try this on.

Exit status: 0 when no problem was found (warnings allowed), 1 otherwise, 2 for bad arguments.
"""

import argparse
import collections
import os
import sys
from typing import Optional, Sequence

import numpy as np

from semijax.data import cityscapes, datasets, folder, image_io, sources, splits, voc
from semijax.data.sources import DataError, LabelValueError


class Report:
  """Collects findings and prints them as they come."""

  def __init__(self, stream=None, max_listed: int = 10):
    self.stream = stream or sys.stdout
    self.max_listed = max_listed
    self.problems = []
    self.warnings = []
    self.fixes = []

  def section(self, title: str) -> None:
    print(f"\n== {title}", file=self.stream)

  def info(self, message: str) -> None:
    print(f"   {message}", file=self.stream)

  def problem(self, message: str, fix: Optional[str] = None) -> None:
    self.problems.append(message)
    print(f"!! {message}", file=self.stream)
    if fix:
      self.fix(fix)

  def fix(self, fix: str) -> None:
    """How to fix the last problem (printed now and repeated in the summary)."""
    print(f"   fix: {fix}", file=self.stream)
    if fix not in self.fixes:
      self.fixes.append(fix)

  def warning(self, message: str, fix: Optional[str] = None) -> None:
    """Something that does not stop training but probably should be changed."""
    self.warnings.append(message)
    print(f"?? warning: {message}", file=self.stream)
    if fix:
      print(f"   fix: {fix}", file=self.stream)

  def files(self, what: str, paths: Sequence[str], fix: Optional[str] = None) -> None:
    """A problem about a list of files: names the first `max_listed` and counts the rest."""
    if paths:
      self.problem(f"{len(paths)} {what}: {sources.list_problems(list(paths), self.max_listed)}",
                   fix)

  def summary(self) -> int:
    self.section("Summary")
    if self.warnings:
      self.info(f"{len(self.warnings)} warning(s): " + "; ".join(self.warnings))
    if not self.problems:
      self.info("no problems found")
      return 0
    self.info(f"{len(self.problems)} problem(s) found")
    for fix in self.fixes:
      self.info(f"to fix: {fix}")
    return 1


READ_FIX = ("replace the named files from the original archives (or re-run the converter that "
            "wrote them)")


def check_records(report: Report, source: sources.FileSource, title: str, *, sample: int,
                  full: bool, read_fix: str = READ_FIX,
                  sizes: Optional[collections.Counter] = None) -> collections.Counter:
  """Decodes a sample of `source` (all with `full`); reports bad files; returns value counts.

  Label values outside the classes are reported apart from unreadable files: one problem
  listing each bad value with the files that hold it and the valid ids (`source.explain_values`).
  `sizes`, if given, counts the image sizes `(H, W)` seen.
  """
  positions = list(range(len(source)))
  picked = positions if (full or len(positions) <= sample) else sorted(
      np.random.default_rng(0).choice(len(positions), size=sample, replace=False).tolist())
  report.section(f"{title}: decoding {len(picked)} of {len(source)} records"
                 + ("" if full or len(picked) == len(source) else " (use --full for all)"))
  raw_counts, mapped_counts, bad, bad_values = (collections.Counter(), collections.Counter(),
                                                [], [])
  for pos in picked:
    item = source.items[pos]
    try:
      image = image_io.read_image(item.image)
      if sizes is not None:
        sizes[image.shape[:2]] += 1
      if source.labeled:
        raw = image_io.read_label(item.label, rgb_palette=source.rgb_palette)
        values, counts = np.unique(raw, return_counts=True)
        raw_counts.update(dict(zip(values.tolist(), counts.tolist())))
        label = source.read_label(item.label)
        image_io.check_same_size(image, label, item.image, item.label)
        values, counts = np.unique(label, return_counts=True)
        mapped_counts.update(dict(zip(values.tolist(), counts.tolist())))
    except LabelValueError as e:
      bad_values.append(e)
    except DataError as e:
      bad.append(str(e))
  if bad:
    report.problem(f"{len(bad)} of {len(picked)} records failed to read:", read_fix)
    for message in bad[:report.max_listed]:
      report.info(f"- {message}")
    if len(bad) > report.max_listed:
      report.info(f"... and {len(bad) - report.max_listed} more")
  if bad_values:
    values = sorted({v for e in bad_values for v in e.values})
    explain = (source.explain_values(values) if hasattr(source, "explain_values")
               else f"valid label ids: {source.info.describe_classes()}")
    by_value = {v: [e.path for e in bad_values if v in e.values] for v in values}
    report.problem(f"{len(bad_values)} of {len(picked)} masks hold label values outside the "
                   f"classes:")
    for v, paths in by_value.items():
      report.info(f"- value {v} in {len(paths)} file{'s' if len(paths) > 1 else ''}: "
                  f"{sources.list_problems(paths, report.max_listed)}")
    report.fix(explain)
  if not bad and not bad_values:
    report.info("all decoded; sizes match; label values valid")
  if source.labeled and mapped_counts:
    total = sum(mapped_counts.values())
    names = source.info.class_names
    shown = ", ".join(
        f"{v} {names[v] if v < len(names) else 'ignore' if v == source.info.ignore_index else '?'}"
        f" {100.0 * c / total:.1f}%" for v, c in sorted(mapped_counts.items()))
    report.info(f"label values (pixel share): {shown}")
    absent = [names[c] for c in range(len(names)) if c not in mapped_counts]
    if absent and len(picked) == len(source):
      report.info(f"classes never seen: {', '.join(absent)}")
  return raw_counts


# ------------------------------------------------------------------------------------- VOC


def check_voc(report: Report, args) -> list:
  """Checks a VOC folder; returns the sources to pack (`[(split, FileSource)]`)."""
  root = args.root
  report.section(f"PASCAL VOC 2012 at {root}")
  if not os.path.isdir(os.path.join(root, voc.IMAGE_DIR)):
    report.problem(f"{root}: no {voc.IMAGE_DIR}/ folder; --root must be the VOC2012 folder",
                   "extract VOCtrainval_11-May-2012.tar and pass .../VOCdevkit/VOC2012")
    return []
  for sub in (voc.IMAGE_DIR, voc.FINE_DIR, voc.AUG_DIR):
    path = os.path.join(root, sub)
    count = len(os.listdir(path)) if os.path.isdir(path) else 0
    report.info(f"{sub + '/':22s} {count:6d} files" + ("" if count else "   (missing)"))
  train = splits.train_ids("voc", directory=args.splits_dir)
  val = splits.val_ids("voc", directory=args.splits_dir)
  fine_train = set(_classic_pool(args.splits_dir))

  if args.fix and args.sbd:
    need = [i for i in train if voc.label_path(root, i) is None]
    if need:
      report.section(f"--fix: converting {len(need)} SBD masks into {voc.AUG_DIR}/")
      try:
        cls_dir = voc.find_sbd_cls_dir(args.sbd)
        have = [i for i in need if os.path.isfile(os.path.join(cls_dir, i + ".mat"))]
        written = voc.convert_sbd(args.sbd, os.path.join(root, voc.AUG_DIR), ids=have)
        report.info(f"wrote {written} PNGs" + (f"; {len(need) - len(have)} ids have no SBD "
                                               f".mat" if len(have) < len(need) else ""))
      except DataError as e:
        report.problem(str(e))
  elif args.fix:
    report.info("--fix for VOC needs --sbd SBD/benchmark_RELEASE/dataset (the SBD masks)")

  report.section(f"Train set (train_aug, {len(train)} images) and val ({len(val)} images)")
  fix_sbd = (f"python -m experiments.prepare_data voc --root {root} --fix --sbd "
             f"SBD/benchmark_RELEASE/dataset   (SBD: benchmark.tgz from the SBD project page)")
  report.files("train images missing",
               [p for p in (voc.image_path(root, i) for i in train) if not os.path.isfile(p)],
               "extract VOCtrainval_11-May-2012.tar (JPEGImages holds every VOC image)")
  no_mask = [i for i in train if voc.label_path(root, i) is None]
  report.files(f"train images have no mask in {voc.FINE_DIR}/ or {voc.AUG_DIR}/",
               [os.path.join(root, voc.AUG_DIR, i + ".png") for i in no_mask], fix_sbd)
  coarse = sorted(i for i in fine_train if voc.label_path(root, i, "fine") is None
                  and voc.label_path(root, i, "aug") is not None)
  if coarse:
    report.info(f"note: {len(coarse)} of the 1464 fine-annotated train images have only an SBD "
                f"mask, so classic-protocol labels will be coarser than in the papers")
  report.files("val images missing",
               [p for p in (voc.image_path(root, i) for i in val) if not os.path.isfile(p)],
               "extract VOCtrainval_11-May-2012.tar")
  report.files(f"val masks missing from {voc.FINE_DIR}/",
               [os.path.join(root, voc.FINE_DIR, i + ".png") for i in val
                if voc.label_path(root, i, "fine") is None],
               "extract VOCtrainval_11-May-2012.tar (SegmentationClass holds the val masks)")
  _check_registered_splits(report, "voc", root, args.splits_dir)

  to_pack = []
  present = [i for i in train
             if voc.label_path(root, i) and os.path.isfile(voc.image_path(root, i))]
  if present:  # `index` = position in train_aug, as `voc.load` gives it
    position = {k: n for n, k in enumerate(train)}
    train_src = voc.source(root, present, indices=[position[k] for k in present])
    check_records(report, train_src, "train_aug (labeled)", sample=args.sample, full=args.full)
    to_pack.append(("train", train_src))
  val_ok = [i for i in val if voc.label_path(root, i, "fine") and
            os.path.isfile(voc.image_path(root, i))]
  if val_ok:
    position = {k: n for n, k in enumerate(val)}
    val_src = voc.source(root, val_ok, label_dir="fine", indices=[position[k] for k in val_ok])
    check_records(report, val_src, "val", sample=args.sample, full=args.full)
    to_pack.append(("val", val_src))
  return to_pack


def _classic_pool(splits_dir: Optional[str]) -> tuple:
  """The 1464 fine-annotated train ids (the classic 1464 labeled list), if present."""
  try:
    return splits.load_split("voc", "classic", "1464", directory=splits_dir).labeled_ids
  except DataError:
    return ()


def _check_registered_splits(report: Report, dataset: str, root: str,
                             splits_dir: Optional[str]) -> None:
  report.section("Split lists")
  missing_fn = voc.missing_files if dataset == "voc" else cityscapes.missing_files
  cache = {}  # (id, labeled) -> number of missing files; the splits share one train set

  def count_missing(ids, labeled):
    for i in ids:
      if (i, labeled) not in cache:
        cache[(i, labeled)] = len(missing_fn(root, [i], labeled=labeled))
    return sum(cache[(i, labeled)] for i in ids)

  for protocol, names in splits.protocols(dataset).items():
    for name in names:
      try:
        spec = splits.load_split(dataset, protocol, name, directory=splits_dir)
      except DataError as e:
        if splits_dir and "split list not found" in str(e):
          report.info(f"{protocol}/{name}: not in {splits_dir} (skipped)")
        else:
          report.problem(str(e))
        continue
      missing = (count_missing(spec.labeled_ids, True)
                 + count_missing(spec.unlabeled_ids, False))
      state = "ok" if not missing else f"{missing} files missing"
      report.info(f"{protocol}/{name}: {spec.num_labeled} labeled, {spec.num_unlabeled} "
                  f"unlabeled: {state}")


# ------------------------------------------------------------------------------ Cityscapes


def check_cityscapes(report: Report, args) -> list:
  """Checks a Cityscapes folder; returns the sources to pack when the files are in place."""
  root = args.root
  report.section(f"Cityscapes at {root}")
  for folder_name in ("leftImg8bit", "gtFine"):
    if not os.path.isdir(os.path.join(root, folder_name)):
      report.problem(f"{root}: no {folder_name}/ folder",
                     "extract leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into --root")
  if report.problems:
    return []
  fix_train_ids = f"python -m experiments.prepare_data cityscapes --root {root} --fix"
  if args.fix:
    report.section("--fix: writing *_gtFine_labelTrainIds.png from *_gtFine_labelIds.png")
    try:
      report.info(f"wrote {cityscapes.convert_label_ids(root)} files")
    except DataError as e:
      report.problem(str(e))
  expected = {"train": splits.train_ids("cityscapes", directory=args.splits_dir),
              "val": splits.val_ids("cityscapes", directory=args.splits_dir)}
  to_pack = []
  for split, ids in expected.items():
    report.section(f"{split}: {len(ids)} images expected")
    on_disk = cityscapes.scan_ids(root, split)
    report.info(f"leftImg8bit/{split}: {len(on_disk)} images on disk")
    extra = sorted(set(on_disk) - set(ids))
    if extra:
      report.info(f"note: {len(extra)} images on disk are in no list (ignored)")
    report.files(f"{split} images missing",
                 [cityscapes.image_path(root, split, i) for i in ids
                  if not os.path.isfile(cityscapes.image_path(root, split, i))],
                 "extract leftImg8bit_trainvaltest.zip")
    no_train_ids = [i for i in ids
                    if not os.path.isfile(cityscapes.label_path(root, split, i, "trainIds"))]
    has_label_ids = [i for i in no_train_ids
                     if os.path.isfile(cityscapes.label_path(root, split, i, "labelIds"))]
    convertible = set(has_label_ids)
    report.files(f"{split} *_gtFine_labelTrainIds.png missing whose *_labelIds.png exist",
                 [cityscapes.label_path(root, split, i, "trainIds") for i in has_label_ids],
                 fix_train_ids)
    report.files(f"{split} labels missing altogether (no labelIds either)",
                 [cityscapes.label_path(root, split, i, "labelIds") for i in no_train_ids
                  if i not in convertible], "extract gtFine_trainvaltest.zip")
    ready = [i for i in ids if os.path.isfile(cityscapes.image_path(root, split, i))
             and os.path.isfile(cityscapes.label_path(root, split, i, "trainIds"))]
    if ready:
      position = {k: n for n, k in enumerate(ids)}
      src = cityscapes.source(root, ready, indices=[position[k] for k in ready])
      check_records(report, src, f"{split} (trainIds)", sample=args.sample, full=args.full)
      to_pack.append((split, src))
  _check_registered_splits(report, "cityscapes", root, args.splits_dir)
  return to_pack


# --------------------------------------------------------------------------------- folder


def check_folder(report: Report, args) -> list:
  """Checks a custom folder dataset; returns the sources to pack."""
  root = args.root
  where = os.path.join(root, folder.METADATA)
  report.section(f"Custom dataset at {root}")
  try:
    dataset = folder.FolderDataset(root)
  except DataError as e:
    report.problem(str(e), f"see README \"Train on your own data\"; example {folder.METADATA}: "
                           f"{folder.EXAMPLE_METADATA}")
    return []
  info = dataset.info
  report.info(f"name {info.name!r}, {info.num_classes} classes; valid label ids: "
              f"{info.describe_classes()}")
  if dataset.ignore_declared:
    report.info(f"ignore value: {dataset.ignore_value} (ignore_index)")
  else:
    report.info("ignore value: none declared (ignore_index defaults to 255, but a mask holding "
                "255 is refused until dataset.json says what it is)")
  if dataset.value_map:
    report.info("value_map: " + ", ".join(f"{k} -> {v}" for k, v in dataset.value_map.items()))
  if info.background_class is None:
    report.info("background class: none (every class gets DGCL anchors; set background_class "
                "if one class means 'no object')")
    if info.class_names[0].lower() in ("background", "bg", "void", "none", "other"):
      report.warning(f"class 0 is called {info.class_names[0]!r} but background_class is not "
                     "set, so methods treat it as an object class",
                     f"add \"background_class\": 0 to {where} if it means 'no object'")
  else:
    report.info(f"background class: {info.background_class} "
                f"({info.class_names[info.background_class]})")
  report.info(f"{len(dataset.masked_ids)} images with masks, {len(dataset.extra_unlabeled_ids)} "
              f"unlabeled images")
  fraction = args.fraction
  if dataset.explicit_labeled and fraction is None:
    shown = "split=explicit"
  else:
    shown = f"split={args.fraction_text or 'full'}"
  try:
    parts = dataset.split(fraction=fraction, seed=args.seed, val_fraction=args.val_fraction)
  except DataError as e:
    report.problem(str(e))
    return []
  val_count = len(parts.val) if parts.val else 0
  val_from = ("splits.val" if dataset.explicit_val else
              f"--val-fraction {args.val_fraction:g}" if args.val_fraction else "none")
  report.info(f"{shown} ({parts.spec.protocol} {parts.spec.name}): {len(parts.labeled)} "
              f"labeled, {len(parts.unlabeled)} unlabeled, {val_count} val (from {val_from})")
  if not val_count:
    report.warning("no val set: training would be refused and mIoU cannot be measured",
                   f"list val images in {where} (\"splits\": {{\"val\": [\"stem\", ...]}}) "
                   "or train with --config.data.val_fraction=0.2 (here: --val-fraction 0.2)")
  to_pack = []
  sizes = collections.Counter()
  if dataset.masked_ids:
    masked = dataset.source(dataset.masked_ids, labeled=True)
    check_records(report, masked, "images + masks", sample=args.sample, full=args.full,
                  read_fix="re-export the named files (they must be PNG/JPEG images that open)",
                  sizes=sizes)
    to_pack.append(("train", masked))
  if dataset.extra_unlabeled_ids:
    extra = dataset.source(dataset.extra_unlabeled_ids, labeled=False)
    check_records(report, extra, "unlabeled/", sample=args.sample, full=args.full,
                  read_fix="re-export the named files (they must be PNG/JPEG images that open)",
                  sizes=sizes)
    to_pack.append(("unlabeled", extra))
  if len(sizes) > 1:
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    report.info(f"image sizes differ ({len(sizes)} sizes, up to {h}x{w}): evaluation batches "
                f"need one shape, so train with --config.data.eval_size='({h}, {w})'")
  if not report.problems:
    split = "explicit" if dataset.explicit_labeled else (args.fraction_text or "1/8")
    val = "" if val_count or not args.val_fraction else \
        f" --config.data.val_fraction={args.val_fraction:g}"
    report.section("Next")
    report.info(f"train: python -m experiments.train --config=experiments/configs/"
                f"mean_teacher.py:dataset=folder,root={root},split={split}{val} "
                f"--workdir=runs/{info.name}")
  return to_pack


def write_example(report: Report, args) -> list:
  """`example`: writes the generated 3-class folder, then checks it like any folder."""
  from semijax.data import example_folder  # pylint: disable=g-import-not-at-top
  out = example_folder.write_example_folder(args.root)
  report.section(f"Example dataset written to {args.root}")
  report.info(f"{out['num_images']} images with masks ({out['num_val']} listed as val), "
              f"{out['num_unlabeled']} unlabeled, classes {', '.join(out['class_names'])}")
  return check_folder(report, args)


def _fraction_arg(text: str) -> float:
  """argparse type: `1/8`, `0.125` or `full`."""
  try:
    return datasets.parse_fraction(text, name="--fraction")
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _val_fraction_arg(text: str) -> float:
  """argparse type: `0`, `1/5` or `0.2`."""
  if text.strip() in ("0", "0.0"):
    return 0.0
  try:
    value = datasets.parse_fraction(text, name="--val-fraction")
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  if value >= 1.0:
    raise argparse.ArgumentTypeError(f"--val-fraction={text!r}; must be below 1")
  return value


# ----------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(
      prog="python -m experiments.prepare_data", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=("voc", "cityscapes", "folder", "example"),
                      help="'example' writes a generated 3-class folder into --root, then "
                           "checks it")
  parser.add_argument("--root", required=True, help="dataset folder")
  parser.add_argument("--fix", action="store_true",
                      help="run the converters for missing label files, then check again")
  parser.add_argument("--sbd", help="VOC: SBD folder (benchmark_RELEASE/dataset) for --fix")
  parser.add_argument("--full", action="store_true", help="decode every record, not a sample")
  parser.add_argument("--sample", type=int, default=200, help="records decoded without --full")
  parser.add_argument("--max-listed", type=int, default=10, help="files named per problem")
  parser.add_argument("--splits-dir", help="split lists replacing the shipped ones (same layout)")
  parser.add_argument("--fraction", type=_fraction_arg,
                      help="folder: labeled fraction to preview, e.g. 1/8, 0.125 or full")
  parser.add_argument("--seed", type=int, default=0, help="folder: seed of the fraction split")
  parser.add_argument("--val-fraction", type=_val_fraction_arg, default=0.0,
                      help="folder: held-out val share, e.g. 1/5 or 0.2 (when dataset.json "
                           "lists no splits.val)")
  parser.add_argument("--to-array-record", metavar="DIR",
                      help="after a clean check, pack the dataset into array_record files here")
  args = parser.parse_args(argv)
  # The fraction as typed, for the suggested train command (`split=1/8`).
  raw = list(argv if argv is not None else sys.argv[1:])
  args.fraction_text = None
  for i, a in enumerate(raw):
    if a == "--fraction" and i + 1 < len(raw):
      args.fraction_text = raw[i + 1]
    elif a.startswith("--fraction="):
      args.fraction_text = a.split("=", 1)[1]
  return args


def main(argv: Optional[Sequence[str]] = None, stream=None) -> int:
  """Runs the checks; returns the exit status (0 clean, 1 problems)."""
  args = parse_args(argv)
  report = Report(stream, args.max_listed)
  if args.dataset != "example" and not os.path.isdir(args.root):
    report.problem(f"{args.root}: folder not found")
    return report.summary()
  check = {"voc": check_voc, "cityscapes": check_cityscapes, "folder": check_folder,
           "example": write_example}[args.dataset]
  try:
    to_pack = check(report, args)
  except DataError as e:  # e.g. a broken --splits-dir
    report.problem(str(e))
    to_pack = []
  status = report.summary()
  if args.to_array_record:
    if status:
      report.info("not packing: fix the problems above first")
    elif to_pack:
      directory = sources.pack_sources(dict(to_pack), args.to_array_record)
      report.info(f"packed {', '.join(f'{k} ({len(s)})' for k, s in to_pack)} into {directory}; "
                  f"read with semijax.data.sources.PackedSource({directory!r}, split)")
  return status


if __name__ == "__main__":
  sys.exit(main())
