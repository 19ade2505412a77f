"""Hugging Face datasets: ``hf:NAME_OR_PATH[:SPLIT]`` through the ``datasets`` library (``pip install
vaejob[hf]``).

NAME_OR_PATH is a ``save_to_disk`` directory (a ``Dataset`` or a ``DatasetDict``), a parquet file or a
directory of parquet files (all offline), or a hub name (``load_dataset``; needs the network and, for
private sets, ``huggingface-cli login``). Without SPLIT a dataset with ``train`` and ``validation`` / ``test``
splits keeps them as its official train / val; with SPLIT only that split is read and val is a key hash.
Images are read from the image column's stored bytes (or file path) and decoded here, so an unreadable
image is skipped and listed like any other source's.
"""

from __future__ import annotations

import glob
import io
import os
import re
from typing import Any

from vaejob.shards.sources.base import Loaded, Source, SourceError, read_image

VAL_SPLITS = ("validation", "valid", "val", "test")
INSTALL = "pip install 'vaejob[hf]' (the datasets library)"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise SourceError(f"hf: sources need the datasets library: {INSTALL}") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def split_spec(arg: str) -> tuple[str, str | None]:
    """``NAME_OR_PATH[:SPLIT]``: the tail after the last ``:`` is a split name unless the whole is a path."""
    head, sep, tail = arg.rpartition(":")
    if sep and head and re.fullmatch(r"[A-Za-z0-9_.\[\]%+-]+", tail) and not os.path.exists(arg):
        return head, tail
    return arg, None


def _load(datasets: Any, target: str, split: str | None) -> Any:
    """A ``Dataset`` or ``DatasetDict`` from a local directory / parquet file, or the hub."""
    try:
        if os.path.isdir(target):
            if any(os.path.isfile(os.path.join(target, f)) for f in ("dataset_dict.json", "state.json")):
                return datasets.load_from_disk(target)
            files = sorted(glob.glob(os.path.join(target, "**", "*.parquet"), recursive=True))
            if not files:
                raise SourceError(
                    f"hf:{target} is neither a save_to_disk directory nor holds .parquet files: "
                    "pass a dataset directory, a parquet file or a hub name"
                )
            return datasets.load_dataset("parquet", data_files={"train": files})
        if os.path.isfile(target):
            if not target.endswith(".parquet"):
                raise SourceError(
                    f"hf:{target} is a file but not .parquet: pass a parquet file or a directory"
                )
            return datasets.load_dataset("parquet", data_files={"train": [target]})
        if target.startswith(("/", "./", "../", "~")):
            raise SourceError(f"hf:{target} not found: pass an existing directory or parquet file")
        return datasets.load_dataset(target, split=split)  # the hub: needs the network
    except SourceError:
        raise
    except Exception as e:  # datasets raises many types; one line with the cause
        text = " ".join(str(e).split())[:300]
        raise SourceError(f"hf:{target}: cannot load it ({type(e).__name__}: {text})") from None


def _named(ds: Any, wanted: str, target: str) -> str:
    if wanted not in ds.column_names:
        raise SourceError(f"hf:{target} has no column {wanted!r} (columns: {', '.join(ds.column_names)})")
    return wanted


def _image_column(datasets: Any, ds: Any, wanted: str | None, target: str) -> str:
    if wanted is not None:
        return _named(ds, wanted, target)
    columns = list(ds.column_names)
    images = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    if images:
        return images[0]
    raise SourceError(
        f"hf:{target} has no image column (columns: {', '.join(columns)}): pass --image-column NAME"
    )


def _label_column(datasets: Any, ds: Any, wanted: str | None, target: str) -> str | None:
    if wanted is not None:
        return _named(ds, wanted, target)
    columns = list(ds.column_names)
    classes = [c for c in columns if isinstance(ds.features[c], datasets.ClassLabel)]
    return classes[0] if classes else ("label" if "label" in columns else None)


class HFDataset(Source):
    """The rows of one or two splits of a Hugging Face dataset; ``load(i)`` decodes row ``i``'s image."""

    def __init__(
        self,
        arg: str,
        size: int | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        datasets = _datasets()
        target, split = split_spec(arg)
        target = os.path.expanduser(target)
        loaded = _load(datasets, target, split)
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            if split is not None:
                if split not in loaded:
                    raise SourceError(f"hf:{target} has no split {split!r} (splits: {', '.join(names)})")
                parts = [(split, loaded[split], None)]
            elif "train" in loaded:
                val = next((s for s in VAL_SPLITS if s in loaded), None)
                parts = [("train", loaded["train"], "train")]
                parts += [(val, loaded[val], "val")] if val else []
            elif len(names) == 1:
                parts = [(names[0], loaded[names[0]], None)]
            else:
                raise SourceError(
                    f"hf:{target} has splits {', '.join(names)} and none is 'train': pass hf:{target}:SPLIT"
                )
        else:
            parts = [(split or "train", loaded, None)]
        if not any(len(ds) for _, ds, _ in parts):
            raise SourceError(f"hf:{target} holds no rows")
        first = parts[0][1]
        self.image_column = _image_column(datasets, first, image_column, target)
        self.label_column = _label_column(datasets, first, label_column, target)
        keep = [self.image_column] + ([self.label_column] if self.label_column else [])
        self.parts = []
        for _, ds, _ in parts:
            ds = ds.select_columns(keep)
            if isinstance(ds.features[self.image_column], datasets.Image):
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # we decode, and catch
            self.parts.append(ds)
        self.name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(target.rstrip("/")) or target)
        self.spec = arg
        self.offsets = []
        self.keys, official = [], []
        for (name, ds, off), _ in zip(parts, self.parts, strict=True):
            self.offsets.append(len(self.keys))
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
            self.keys += [f"{safe}-{i:08d}" for i in range(len(ds))]
            official += [off] * len(ds)
        self.official = official if all(o is not None for o in official) and len(parts) > 1 else None
        self.label_names = self._label_names(datasets)
        self.scan_skipped = []
        self.draft_size = size or 64
        probe = self._first_image()
        self.native_channels = probe.shape[2] if probe is not None else 3
        self.native_size = min(probe.shape[:2]) if probe is not None else 64

    def _label_names(self, datasets: Any) -> list[str] | None:
        if self.label_column is None:
            return None
        feature = self.parts[0].features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        values = [v for ds in self.parts for v in ds[self.label_column] if v is not None]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise SourceError(
                f"hf:{self.spec}: label column {self.label_column!r} is not class indices (>= 0): "
                "pass --label-column with an integer or ClassLabel column"
            )
        return [str(i) for i in range(max(values) + 1)] if values else None

    def _first_image(self) -> Any:
        for i in range(min(len(self.keys), 8)):
            try:
                return self.load(i)[0]
            except Exception:  # unreadable rows are skipped when written; any readable one tells the size
                continue
        return None

    def _row(self, i: int) -> tuple[Any, int]:
        k = max(j for j, off in enumerate(self.offsets) if off <= i)
        return self.parts[k][i - self.offsets[k]], k

    def where(self, i: int) -> str:
        return f"hf:{self.spec} row {self.keys[i]}"

    def load(self, i: int) -> Loaded:
        row, _ = self._row(i)
        value = row[self.image_column]
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, bytes | bytearray):
            data, path = bytes(value), None
        else:
            raise ValueError(f"column {self.image_column!r} holds {type(value).__name__}, not an image")
        if data is None and not path:
            raise ValueError("no image bytes or path")
        arr = read_image(io.BytesIO(data) if data is not None else path, self.draft_size)
        label = row[self.label_column] if self.label_column else None
        return arr, (int(label) if label is not None and int(label) >= 0 else None), None
