"""The shard writer behind ``cmcr shard``: corpora -> webdataset tar shards of N samples.

Output layout (one folder per modality found in the inputs)::

    <out>/<modality>/shard-000000.tar     members <key>.<ext> (the original file bytes, never
                                          re-encoded) and <key>.json (per-sample metadata:
                                          key, modality, source, label, other columns)
    <out>/<modality>/shards.json          index written last: shards, sample counts, bytes, sha256,
                                          inputs (the encode stage takes shard identities from it)

Same input, same shards: samples keep the readers' deterministic order, tar headers carry no
time, owner or permission noise (mtime 0, uid/gid 0, mode 0444), and every shard is written to a
temp file and renamed. Leftover shards of an earlier, larger run in the same folder are removed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcr.errors import InputDataError
from cmcr.pipeline.corpora import CorpusEntry, Skipped, read_corpus
from cmcr.pipeline.openers import expand_url, is_url
from cmcr.stores.files import atomic_replace, atomic_write_json, locks_output, sha256_file

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_NAME = "shards.json"


@dataclass
class ShardReport:
    """What :func:`write_shards` produced.

    Attributes:
        out_dir: output folder.
        shards: modality -> list of shard paths (in order).
        counts: modality -> number of samples written.
        skipped: inputs that did not become samples, with the reason.
        duplicates: samples dropped because their key was already taken in the same modality.
        replaced: modalities whose folder held shards of different content before (its old
            ``shards.json`` listed other files or digests): stores encoded from them are stale.
        failed: inputs (tars, URLs) that could not be read to their end, with the error (naming
            the URL/file and the fix); the samples read before the error were written. Also listed
            in every ``shards.json`` written (``failed_inputs``).
    """

    out_dir: Path
    shards: dict[str, list[Path]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[Skipped] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir),
                "shards": {m: [str(p) for p in ps] for m, ps in self.shards.items()},
                "counts": dict(self.counts),
                "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped],
                "duplicates": [{"source": s.source, "reason": s.reason} for s in self.duplicates],
                "replaced": list(self.replaced),
                "failed": [{"input": s.source, "error": s.reason} for s in self.failed]}


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _json_default(o: Any) -> Any:
    return str(o)


class _ShardSink:
    """Writes the samples of one modality into consecutive shards of ``samples_per_shard``."""

    def __init__(self, folder: Path, samples_per_shard: int):
        self.folder = folder
        self.samples_per_shard = samples_per_shard
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self.digests: list[str] = []
        self.sizes: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._n = 0
        self.total = 0
        self.keys: set[str] = set()

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / SHARD_PATTERN.format(len(self.paths))
        self._tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self.paths.append(final)
        self._n = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        atomic_replace(self._tmp, self.paths[-1])
        self.digests.append(sha256_file(self.paths[-1]))
        self.sizes.append(self.paths[-1].stat().st_size)
        self.counts.append(self._n)
        self._tar = None

    def add(self, key: str, ext: str, payload: bytes, meta: dict[str, Any]) -> None:
        if self._tar is None or self._n >= self.samples_per_shard:
            self._close()
            self._open()
        assert self._tar is not None
        body = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=_json_default).encode()
        self._tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        self._tar.addfile(_tarinfo(f"{key}.json", len(body)), io.BytesIO(body))
        self._n += 1
        self.total += 1
        self.keys.add(key)

    def finish(self, inputs: Sequence[str], modality: str, failed: Sequence[Skipped] = ()) -> bool:
        """Close the last shard, remove leftovers, write the index; True when the folder's previous
        index described other shard contents (stores encoded from those shards are now stale)."""
        self._close()
        previous = _index_contents(self.folder / INDEX_NAME)
        keep = {p.name for p in self.paths}
        for old in self.folder.glob("shard-*.tar"):
            if old.name not in keep:
                old.unlink()
        roots = sorted({str(Path(p).resolve()) for p in inputs if not is_url(p) and Path(p).is_dir()})
        index = {"modality": modality, "samples": self.total, "inputs": list(inputs), "media_roots": roots,
                 "shards": [{"file": p.name, "samples": n, "bytes": b, "sha256": h}
                            for p, n, b, h in zip(self.paths, self.counts, self.sizes, self.digests, strict=True)]}
        if failed:
            index["failed_inputs"] = [{"input": f.source, "error": f.reason} for f in failed]
        atomic_write_json(self.folder / INDEX_NAME, index)
        return previous is not None and previous != _index_contents(self.folder / INDEX_NAME)


def _index_contents(index: Path) -> list[tuple[str, str]] | None:
    """``(file, sha256)`` of every shard a ``shards.json`` lists; ``None`` without a readable index."""
    try:
        entries = json.loads(index.read_text()).get("shards", [])
        return [(str(e.get("file")), str(e.get("sha256"))) for e in entries]
    except (OSError, ValueError, AttributeError, TypeError):
        return None


@locks_output("out_dir")
def write_shards(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    *,
    modality: str | None = None,
    text_column: str | None = None,
    path_column: str | None = None,
    key_column: str | None = None,
    label_column: str = "label",
) -> ShardReport:
    """Read corpora and write webdataset shards (see the module docstring and :mod:`.corpora`).

    Args:
        inputs: folders, ``.txt`` lists, ``.csv``/``.tsv``/``.jsonl`` tables, ``.tar`` shards, shard URLs
            (``pipe:CMD``, ``http(s)://``, ``s3://``...; a brace range stands for every expansion, see
            :mod:`cmcr.pipeline.openers`), any mix. Image+caption tars (img2dataset's layout) give image
            and text shards paired by key (:func:`cmcr.pipeline.corpora.read_tar`).
        out_dir: output folder; shards go to ``<out_dir>/<modality>/shard-NNNNNN.tar``.
        samples_per_shard: N samples per shard (the last shard may hold fewer).
        modality: keep only samples of this modality (others are reported as skipped).
        text_column, path_column, key_column, label_column: column choices for tables.

    Returns:
        A :class:`ShardReport` (shard paths per modality, counts, skipped entries with reasons, failed
        inputs: a tar or URL that could not be read to its end is recorded there, never skipped silently).

    Raises:
        InputDataError: an input does not exist, is of an unknown kind, a table lacks the columns,
            or no input yields a sample (empty folder/table, everything skipped).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if samples_per_shard < 1:
        raise InputDataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    report = ShardReport(out_dir=out)
    sinks: dict[str, _ShardSink] = {}
    table_kwargs = {"text_column": text_column, "path_column": path_column, "key_column": key_column,
                    "label_column": label_column}
    inputs = [u for p in inputs for u in (expand_url(str(p)) if is_url(p) else [p])]
    entries: list[Iterable[CorpusEntry]] = [read_corpus(p, report.skipped, **table_kwargs) for p in inputs]
    for stream in entries:
        for entry in stream:
            if modality is not None and entry.modality != modality:
                report.skipped.append(Skipped(str(entry.meta.get("source")),
                                              f"modality {entry.modality}, not the requested {modality}"))
                continue
            sink = sinks.get(entry.modality)
            if sink is None:
                sink = sinks[entry.modality] = _ShardSink(out / entry.modality, samples_per_shard)
            if entry.key in sink.keys:
                report.duplicates.append(Skipped(str(entry.meta.get("source")),
                                                 f"key {entry.key!r} already used by an earlier sample"))
                continue
            try:
                payload = entry.payload()
            except OSError as e:
                report.skipped.append(Skipped(str(entry.meta.get("source")), f"cannot read ({e})"))
                continue
            meta = {**entry.meta, "key": entry.key, "modality": entry.modality}
            sink.add(entry.key, entry.ext, payload, meta)
    report.failed = [s for s in report.skipped if s.failed]
    report.skipped = [s for s in report.skipped if not s.failed]
    for s in report.failed:
        log.error("input failed: %s", s.reason)
    if not sinks:
        report.skipped += report.failed
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in report.skipped[:5])
        raise InputDataError(
            f"no samples found in {', '.join(str(p) for p in inputs)}"
            + (f" (modality {modality})" if modality else "")
            + (f"; skipped {len(report.skipped)} entries ({reasons}{' ...' if len(report.skipped) > 5 else ''})"
               if report.skipped else " (empty)")
            + "; pass a folder of media files, a .txt list, a .csv/.jsonl table with rows, or .tar shards"
        )
    for mod, sink in sorted(sinks.items()):
        if sink.finish([str(p) for p in inputs], mod, report.failed):
            report.replaced.append(mod)
            log.warning("%s: replaced shards of different content; stores encoded from the old shards no "
                        "longer match them (encode into a new store, or with --overwrite)", out / mod)
        report.shards[mod] = list(sink.paths)
        report.counts[mod] = sink.total
    for s in report.skipped:
        log.info("skipped %s: %s", s.source, s.reason)
    return report
