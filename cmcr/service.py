"""Cross-modal search held in memory: one connector, its projected galleries and the query encoders.

:class:`SearchService` is what ``cmcr serve`` (HTTP) wraps: it loads the connector, opens every
gallery (a store projected by that connector, with its FAISS index when there is one) and the
query encoders **once**, then answers queries by text, uploaded media or the key of a stored row in
milliseconds. The same class answers ``cmcr search`` queries (docs/serve.md).

A query is embedded by a query encoder, projected by the connector side that accepts that encoder's
identity and modality (paper §3.2: both projectors map into one connected space) and compared by
cosine with the gallery rows (also projected), i.e. nearest neighbours by inner product of unit rows.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import CmcrError, ConnectorError, InputDataError

log = logging.getLogger(__name__)

#: modalities a query file may have (text comes as a string, not a file)
QUERY_MODALITIES = ("image", "audio", "3d")


def modality_of_filename(name: str, hint: str = "") -> str:
    """The modality of a media file name by its extension (``audio``, ``image``, ``3d``), from the one list
    of media extensions (:mod:`cmcr.pipeline.media`).

    Args:
        name: the file name or path.
        hint: appended to the error (e.g. the CLI's ``Pass --modality``).

    Raises:
        InputDataError: the extension is not a known media extension (names the file and lists them).
    """
    from cmcr.pipeline.media import MEDIA_EXTENSIONS, modality_of

    modality = modality_of(name)
    if modality not in QUERY_MODALITIES:
        known = "; ".join(f"{m}: {', '.join(MEDIA_EXTENSIONS[m])}" for m in QUERY_MODALITIES)
        raise InputDataError(f"cannot tell the modality of {name!r} from its extension; known: {known}"
                             + (f". {hint}" if hint else ""))
    return modality


def query_extensions(modalities: Sequence[str]) -> set[str]:
    """``.ext`` of every media file a query of these modalities may be (for the page's file picker)."""
    from cmcr.pipeline.media import MEDIA_EXTENSIONS

    return {f".{e}" for m in modalities if m in QUERY_MODALITIES for e in MEDIA_EXTENSIONS[m]}


@dataclass
class Gallery:
    """One searchable projected store.

    Attributes:
        name: URL-safe name (the store folder name, made unique).
        store: the opened :class:`~cmcr.stores.store.Store` (projected by the service's connector).
        index: its FAISS index (``None``: exact search over the in-memory rows).
        side: the connector side whose encoder made the rows (``"A"``/``"B"``).
        media_roots: folders the rows' ``source`` paths are relative to (may be empty).
    """

    name: str
    store: Any
    index: Any
    side: str
    media_roots: list[Path] = field(default_factory=list)
    shortlist: ExactShortlist | None = None
    _emb: np.ndarray | None = None
    _table: Any = None  # keys + metadata (pyarrow), read once; rows are taken from it per hit

    @property
    def modality(self) -> str:
        return self.store.modality

    @property
    def search_kind(self) -> str:
        """How a query is searched: the approximate index's kind (``"hnsw"``, ``"ivf"``), else ``"exact"``
        (a flat index, the rows in memory or the certified :class:`ExactShortlist`: the exact top-k)."""
        return "exact" if self.index is None or self.index.kind == "flat" else str(self.index.kind)

    def table(self) -> Any:
        """Keys and metadata columns of every row (a pyarrow Table, read once and kept)."""
        if self._table is None:
            self._table = self.store.metadata().combine_chunks()
        return self._table

    def row_of(self, key: str) -> int | None:
        """The row number of ``key`` (``None`` when the gallery has no such key)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        i = pc.index(self.table().column("key"), pa.scalar(key, pa.string())).as_py()
        return None if i < 0 else int(i)

    def rows(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """``{"key", "metadata"}`` of the given rows (only those rows become Python objects)."""
        picked = self.table().take(list(rows)).to_pylist()
        return [{"key": r.pop("key"), "metadata": r} for r in picked]

    def exact_rows(self) -> np.ndarray:
        """The ``(N, D)`` float32 rows exact search compares with: the flat index's own vectors (no copy;
        memory-mapped) when the index is flat, else the store rows held in memory."""
        if self.index is not None and self.index.kind == "flat":
            import faiss

            ix = self.index.index
            return faiss.rev_swig_ptr(ix.get_xb(), ix.ntotal * ix.d).reshape(ix.ntotal, ix.d)
        return self.embeddings()

    def embeddings(self) -> np.ndarray:
        if self._emb is None:
            self._emb = np.ascontiguousarray(self.store.embeddings(np.float32))
        return self._emb

    def embedding_of(self, row: int) -> np.ndarray:
        """The ``(D,)`` float32 row (from memory when held, else read from its part only)."""
        if self._emb is not None:
            return self._emb[row]
        return self.store.embeddings_of([row], np.float32)[0]

    def search(self, q: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Top-``k`` rows for one query row ``q`` (``(D,)`` float32 unit vector) as hit dicts."""
        k = max(1, min(int(k), self.store.num_rows))
        pin_search_threads()
        q2 = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if self.shortlist is not None:  # a cosine gallery: unit query, as the index would make it
            rows, scores = self.shortlist.search(q2[0] / max(float(np.linalg.norm(q2[0])), 1e-12), k)
        elif self.index is not None:
            sc, rw = self.index.search_arrays(q2, k=k)
            keep = rw[0] >= 0
            rows = [int(r) for r in rw[0][keep]]
            scores = [float(x) for x in sc[0][keep]]
        else:
            s = self.embeddings() @ q2[0]
            top = np.argsort(-s, kind="stable")[:k]
            rows = [int(i) for i in top]
            scores = [float(s[i]) for i in top]
        return [{"key": h["key"], "score": sc, "row": r, "metadata": h["metadata"]}
                for r, sc, h in zip(rows, scores, self.rows(rows), strict=True)]

    def media_path(self, key: str) -> Path | None:
        """The media file of row ``key`` inside one of :attr:`media_roots`, or ``None``."""
        row = self.row_of(key)
        if row is None:
            return None
        return self.resolve_media(self.rows([row])[0]["metadata"].get("source"))

    def resolve_media(self, source: Any) -> Path | None:
        """``source`` (a row's path relative to its media root) as an existing file inside one of
        :attr:`media_roots`, or ``None``. Path traversal is refused: the resolved file must lie inside
        the root it was joined to."""
        if not source or not isinstance(source, str):
            return None
        for root in self.media_roots:
            root = root.resolve()
            p = (root / source).resolve()
            if p.is_file() and (p == root or root in p.parents):
                return p
        return None


class ExactShortlist:
    """Exact top-k inner-product search, certified, over a float16 copy of the rows (half the bytes of
    a flat float32 scan; measured 1.7-1.9x faster at 100k x 512).

    A query is scored against the float16 rows (FAISS ``SQfp16``); the best ``C`` candidates are
    re-scored with the float32 rows, and the answer is returned only when it is **provably** the exact
    top-k: for unit ``q`` and rows of norm ≤ ``r``, rounding a row to float16 moves its score by at most
    ``eps = 2^-10 · r · |q| + 1e-4`` (float16 relative error 2^-11, taken twice for safety, plus float32
    accumulation), so a row outside the candidates scores at most ``s̃_C + eps``; when that is below
    the k-th exact candidate score, no outside row can enter the top k. Otherwise ``C`` grows (x4) and
    the check repeats, ending with a full float32 scan. Results equal exact search (up to ties).

    Args:
        rows: ``(N, D)`` float32 rows (e.g. a flat index's vectors); kept by reference, not copied.
        chunk: rows added to the float16 index per step (bounds the temporary memory).
    """

    MIN_CANDIDATES = 64

    def __init__(self, rows: np.ndarray, chunk: int = 65536):
        import faiss

        self.rows = rows
        n, d = rows.shape
        self.index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        r = 0.0
        for start in range(0, n, chunk):
            part = np.ascontiguousarray(rows[start:start + chunk], dtype=np.float32)
            r = max(r, float(np.sqrt((part * part).sum(axis=1).max())))
            self.index.add(part)
        self.max_norm = r
        self.full_scans = 0  # searches that ended in a float32 scan (the bound never certified)

    def search(self, q: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        """Exact top-``k`` of ``rows @ q``: ``(rows, scores)`` best first, ties by lower row number.

        Args:
            q: ``(D,)`` float32 query.
            k: 1 ≤ k ≤ N.
        """
        n = self.index.ntotal
        q = np.ascontiguousarray(q, dtype=np.float32)
        eps = 2.0 ** -10 * self.max_norm * float(np.linalg.norm(q)) + 1e-4
        c = max(self.MIN_CANDIDATES, 4 * k)
        while c < n // 4:
            approx, cand = self.index.search(q[None], c)
            cand = cand[0][cand[0] >= 0]
            exact = self.rows[cand] @ q
            order = np.lexsort((cand, -exact))[:k]
            if approx[0][-1] + eps < exact[order[-1]]:
                return [int(i) for i in cand[order]], [float(x) for x in exact[order]]
            c *= 4
        self.full_scans += 1
        exact = self.rows @ q
        kth = exact[np.argpartition(-exact, k - 1)[k - 1]]
        top = np.flatnonzero(exact >= kth)  # every row tied with the k-th too: ties go to the lower row
        top = top[np.lexsort((top, -exact[top]))][:k]
        return [int(i) for i in top], [float(exact[i]) for i in top]


#: Galleries of at least this many rows searched exactly get an :class:`ExactShortlist`
SHORTLIST_MIN_ROWS = 20_000


def open_gallery(store: Any, name: str | None = None, media_roots: Sequence[str | os.PathLike] | None = None,
                 *, shortlist: bool = True) -> Gallery:
    """A :class:`Gallery` over a projected store, with its FAISS index when it has a current one
    (else exact search over the rows held in memory).

    Args:
        store: an opened projected :class:`~cmcr.stores.store.Store`.
        name: gallery name (default: the store folder name).
        media_roots: folders of the rows' media (default: recorded in the store, see :func:`media_roots_of`).
        shortlist: search an exact (flat or index-less) cosine gallery of ≥ :data:`SHORTLIST_MIN_ROWS`
            rows through a certified float16 :class:`ExactShortlist` (same results, ~1.7x faster).
    """
    index = None
    try:
        from cmcr.stores.index import open_index

        index = open_index(store)
    except (ImportError, CmcrError) as e:
        log.info("gallery %s: no usable index (%s); exact search", store.path, e)
    roots = [Path(r) for r in media_roots] if media_roots else media_roots_of(store)
    g = Gallery(name=name or _safe_name(Path(store.path).name), store=store, index=index,
                side=str(store.encoder.get("side", "")), media_roots=roots)
    if shortlist and g.search_kind == "exact" and store.metric == "cosine" and store.num_rows >= SHORTLIST_MIN_ROWS:
        g.shortlist = ExactShortlist(g.exact_rows())
    return g


def media_roots_of(store: Any) -> list[Path]:
    """Folders the media of ``store`` live in, from its manifest (``extra.media_roots``), following a
    projected store back to the store it was projected from."""
    from cmcr.stores.store import Store

    seen: set[str] = set()
    s = store
    for _ in range(4):
        extra = s.manifest.get("extra") or {}
        roots = extra.get("media_roots")
        if roots:
            return [Path(r) for r in roots]
        src = (extra.get("projected") or {}).get("source_store")
        if not src or src in seen or not (Path(src) / "manifest.json").is_file():
            return []
        seen.add(src)
        try:
            s = Store.open(src)
        except CmcrError:
            return []
    return []


class MicroBatcher:
    """Run ``fn(items) -> results`` for concurrent callers, at most ``slots`` calls at a time, each on
    up to ``max_batch`` items gathered from the callers waiting (one forward pass reads the model
    weights once for the whole batch).

    No thread of its own: a caller that finds a free slot takes the oldest waiting items (its own
    among them or not), runs ``fn`` and hands every caller its result; the others wait. With
    ``slots`` callers or fewer, nobody waits and nothing is batched. When ``fn`` raises on a batch,
    each item is retried alone so that one bad item fails only its own caller.

    Args:
        fn: ``Sequence[item] -> Sequence[result]`` (same length and order).
        slots: calls of ``fn`` allowed at once (>= 1).
        max_batch: most items per call (>= 1; 1 = no batching).
    """

    def __init__(self, fn: Any, slots: int = 1, max_batch: int = 16):
        if slots < 1 or max_batch < 1:
            raise ValueError(f"slots and max_batch must be >= 1, got {slots}, {max_batch}")
        self.fn, self.slots, self.max_batch = fn, slots, max_batch
        self._cv = threading.Condition()
        self._waiting: list[list[Any]] = []  # [item, done, result, error]
        self._free = slots
        self.calls = 0
        self.batched_items = 0  # items that shared a call with others

    def __call__(self, item: Any) -> Any:
        job = [item, False, None, None]
        with self._cv:
            self._waiting.append(job)
        while True:
            with self._cv:
                while not job[1] and not (self._free and self._waiting):
                    self._cv.wait()
                if job[1]:
                    if job[3] is not None:
                        raise job[3]
                    return job[2]
                batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
                self._free -= 1
                self.calls += 1
                self.batched_items += len(batch) if len(batch) > 1 else 0
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._free += 1
                    self._cv.notify_all()

    def _run(self, batch: list[list[Any]]) -> None:
        try:
            results = self.fn([j[0] for j in batch])
            for j, r in zip(batch, results, strict=True):
                j[2] = r
        except Exception as e:  # noqa: BLE001 - retried alone below, each caller gets its own outcome
            if len(batch) == 1:
                batch[0][3] = e
            else:
                for j in batch:
                    try:
                        j[2] = self.fn([j[0]])[0]
                    except Exception as e1:  # noqa: BLE001 - handed to that caller
                        j[3] = e1
        with self._cv:
            for j in batch:
                j[1] = True


class QueryCache:
    """LRU cache of query embeddings, keyed by ``(encoder identity, text quantisation, connector, side,
    modality, text)``: an entry is found only for the same model, the same numeric path and the same
    connected space. Thread-safe. ``size=0`` disables it."""

    def __init__(self, size: int = 1024):
        from collections import OrderedDict

        self.size = max(0, int(size))
        self._d: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(encoder: Any, connector_fingerprint: str, side: str, modality: str, text: str) -> tuple:
        import json

        return (json.dumps(encoder.identity(), sort_keys=True, default=str), encoder.text_quantization,
                connector_fingerprint, side, modality, text)

    def get(self, key: tuple) -> np.ndarray | None:
        if not self.size:
            return None
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple, value: np.ndarray) -> None:
        if not self.size:
            return
        v = np.array(value, dtype=np.float32)
        v.flags.writeable = False
        with self._lock:
            self._d[key] = v
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class SearchService:
    """A connector, its galleries and query encoders, loaded once.

    Args:
        connector: connector folder (``cmcr connect`` or ``cmcr connector import`` output).
        galleries: projected stores (``cmcr project`` output) of this connector.
        encoders: encoder specs for queries (``open_clip:ViT-B-32``, ``clap:HTSAT-tiny@ckpt.pt``...);
            each must be the encoder of one connector side. Empty: query by key only.
        clap_tokenizer: folder with the ``roberta-base`` tokenizer files (CLAP text queries).
        media_roots: ``{gallery name: folder}`` overriding the roots recorded in the stores.
        device: torch device of the encoders.
        threads: torch and FAISS threads per forward pass / search (process-wide; ``None``: leave as is).
            1 (the ``cmcr serve`` default) lets concurrent queries run on separate cores instead of
            every op waiting for all cores, which a shared or busy machine makes very slow.
        slots: encoder forward passes at once (default: CPUs // threads, at least 1).
        max_batch: text queries waiting for a slot are embedded together, up to this many per forward
            pass (1: never batch). Queries of an int8 text tower are never batched (its activation scale
            is per call, so a batch would change each query's embedding).
        quantize_text: ``"int8"``: text queries go through an int8 copy of the text tower (opt-in,
            approximate; see :meth:`cmcr.pipeline.openclip_encoder.OpenClipEncoder.quantize_text`).
        cache_size: LRU cache of text query embeddings (entries; 0: off), see :class:`QueryCache`.
        shortlist: certified float16 exact search of large flat galleries (:class:`ExactShortlist`).

    Raises:
        ConnectorError: a gallery was not projected by this connector (wrong space), or an encoder is
            not the encoder of either side.
        CmcrError: a store, index or encoder cannot be opened.
    """

    def __init__(self, connector: str | os.PathLike, galleries: Sequence[str | os.PathLike], *,
                 encoders: Sequence[str] = (), clap_tokenizer: str | None = None,
                 media_roots: Mapping[str, str | os.PathLike] | None = None, device: str = "cpu",
                 threads: int | None = None, slots: int | None = None, max_batch: int = 16,
                 quantize_text: str | None = None, cache_size: int = 1024, shortlist: bool = True):
        from cmcr.stores.store import Store
        from cmcr.trainer.connector import Connector, is_projected

        if threads is not None:
            set_threads(threads)

        if not galleries:
            raise InputDataError("give at least one --gallery (a store projected by the connector)")
        self.connector = Connector.load(connector)
        self.connector_path = Path(connector)
        self.galleries: dict[str, Gallery] = {}
        for g in galleries:
            store = Store.open(g)
            if not (is_projected(store.encoder) and store.encoder.get("connector") == self.connector.fingerprint):
                holds = "a projection by another connector" if is_projected(store.encoder) else "raw embeddings"
                raise ConnectorError(
                    f"gallery {g} is not in the space of connector {connector} ({self.connector.fingerprint}): "
                    f"it holds {holds}; run `cmcr project {connector} <store> {g}` first")
            name = _unique(_safe_name(Path(g).name), self.galleries)
            roots = [media_roots[name]] if media_roots and name in media_roots else None
            gal = self.galleries[name] = open_gallery(store, name, roots, shortlist=shortlist)
            if gal.index is None:
                gal.embeddings()  # exact search: hold the rows once
        if slots is None:
            import torch

            slots = max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))
        self.slots, self.max_batch = int(slots), int(max_batch)
        self.cache = QueryCache(cache_size)
        self._forward = threading.BoundedSemaphore(self.slots)  # media forwards share the slots budget
        self.encoders: list[tuple[Any, dict[str, str]]] = []
        self._text_batchers: dict[int, MicroBatcher] = {}
        for spec in encoders:
            from cmcr.pipeline.encoders import load_encoder

            enc = load_encoder(spec, device=device, clap_tokenizer=clap_tokenizer)
            sides = {}
            for mod in enc.modalities:
                try:
                    sides[mod] = self.connector.side_for(enc.identity(), mod)
                except ConnectorError:
                    continue
            if not sides:
                raise ConnectorError(f"encoder {spec} is not the encoder of either side of {connector}: "
                                     f"{self.connector.sides['A'].mcr} / {self.connector.sides['B'].mcr}")
            if quantize_text and "text" in sides:
                enc.quantize_text(quantize_text)
            self.encoders.append((enc, sides))
            if "text" in sides:
                self._text_batchers[id(enc)] = MicroBatcher(
                    functools.partial(enc.encode, "text"), slots=self.slots,
                    max_batch=1 if enc.text_quantization else self.max_batch)

    # ------------------------------------------------------------------------------- facts
    def random_weights(self) -> list[dict[str, Any]]:
        """Random-init encoder identities behind the connector, the galleries and the query encoders."""
        from cmcr.trainer.evaluate import random_weight_identities

        return random_weight_identities(self.connector, *(g.store for g in self.galleries.values()),
                                        *(enc.identity() for enc, _ in self.encoders))

    def query_modalities(self) -> list[str]:
        """Modalities a query may have (those of the query encoders)."""
        return sorted({m for _, sides in self.encoders for m in sides})

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: connector, galleries (name, rows, modality, side, media), encoders."""
        return {
            "connector": {"path": str(self.connector_path), "fingerprint": self.connector.fingerprint,
                          "sides": {s: {"mcr": i.mcr, "modalities": list(i.modalities)}
                                    for s, i in self.connector.sides.items()}},
            "galleries": [{"name": g.name, "path": str(g.store.path), "rows": g.store.num_rows,
                           "modality": g.modality, "side": g.side, "mcr": self.connector.sides[g.side].mcr,
                           "index": g.index is not None, "search": g.search_kind, "media": bool(g.media_roots)}
                          for g in self.galleries.values()],
            "query_modalities": self.query_modalities(),
            "localize": self.localizer() is not None,
            "encoders": [{"identity": enc.identity(), "sides": sides, "text_quantization": enc.text_quantization}
                         for enc, sides in self.encoders],
            "serving": {"threads": _threads(), "slots": self.slots, "max_batch": self.max_batch,
                        "query_cache": self.cache.size,
                        "shortlist": [g.name for g in self.galleries.values() if g.shortlist is not None]},
            "random_weights": bool(self.random_weights()),
        }

    def hints(self) -> list[str]:
        """Serving advice printed by ``cmcr serve`` at start: one line per exact-search gallery of at least
        :data:`SHORTLIST_MIN_ROWS` rows, naming the command that gives it an HNSW index (sub-millisecond
        search at a measured recall@10 instead of a scan of every row per query: about 16 ms vs 1 ms at
        100k × 512 on one core, docs/serve.md#performance)."""
        return [f"gallery {g.name}: exact search over {g.store.num_rows:,} rows per query; for faster queries "
                f"index it (approximate, recall@10 measured and saved): cmcr store index {g.store.path} --kind hnsw "
                "--queries <a projected store of queries like the ones it will get, e.g. captions>"
                for g in self.galleries.values()
                if g.search_kind == "exact" and g.store.num_rows >= SHORTLIST_MIN_ROWS]

    def gallery(self, name: str) -> Gallery:
        """The gallery called ``name``. Raises :class:`InputDataError` naming the known ones."""
        if name not in self.galleries:
            raise InputDataError(f"no gallery {name!r}; known: {', '.join(self.galleries)}")
        return self.galleries[name]

    # ------------------------------------------------------------------------------ queries
    def _encoder_for(self, modality: str, prefer_side: str | None) -> tuple[Any, str]:
        found = [(enc, sides[modality]) for enc, sides in self.encoders if modality in sides]
        if not found:
            raise InputDataError(f"no query encoder for {modality!r} queries; this service embeds "
                                 f"{self.query_modalities() or 'nothing (start it with --encoder)'}")
        for enc, side in found:
            if side == prefer_side:
                return enc, side
        return found[0]

    def embed_text(self, text: str, *, side: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """A caption -> ``(D,)`` float32 unit row in the connected space.

        Args:
            text: the caption (non-blank).
            side: prefer the text encoder of this connector side (``None``: the first one).

        Raises:
            InputDataError: blank text or no text encoder.
        """
        if not text or not text.strip():
            raise InputDataError("the text query is empty")
        enc, s = self._encoder_for("text", side)
        info: dict[str, Any] = {"text": text, "modality": "text", "side": s}
        if enc.text_quantization:
            info["text_quantization"] = enc.text_quantization
        key = QueryCache.key(enc, self.connector.fingerprint, s, "text", text)
        q = self.cache.get(key)
        if q is not None:
            return q, {**info, "cached": True}
        raw = self._text_batchers[id(enc)](text)
        q = self.connector.project(s, raw[None], identity=enc.identity(), modality="text")[0]
        self.cache.put(key, q)
        return q, info

    def embed_media(self, data: bytes, filename: str, *, side: str | None = None) -> tuple[np.ndarray, dict]:
        """Uploaded media bytes (image, audio, point cloud) -> ``(D,)`` float32 unit row.

        The modality comes from ``filename``'s extension. Raises :class:`InputDataError` for an unknown
        extension, a missing encoder or a file the encoder cannot decode (the decoder's reason).
        """
        modality = modality_of_filename(filename)
        enc, s = self._encoder_for(modality, side)
        suffix = Path(filename).suffix.lower()
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                with self._forward:
                    raw = enc.encode(modality, [tmp.name])
            except CmcrError as e:  # name the upload, not the server's temporary copy
                raise InputDataError(f"{filename}: {str(e).replace(tmp.name, filename)}") from e
        if not np.all(np.isfinite(raw)):
            raise InputDataError(f"{filename}: the encoder produced no valid embedding (empty or silent input?)")
        q = self.connector.project(s, raw, identity=enc.identity(), modality=modality)[0]
        return q, {"media": filename, "modality": modality, "side": s}

    def embed_key(self, gallery: str, key: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The projected row ``key`` of a gallery (query by example)."""
        g = self.gallery(gallery)
        row = g.row_of(key)
        if row is None:
            raise InputDataError(f"gallery {gallery} has no key {key!r}")
        return g.embedding_of(row), {"key": key, "gallery": gallery, "modality": g.modality, "side": g.side}

    def search(self, q: np.ndarray, gallery: str, k: int = 10) -> list[dict[str, Any]]:
        """Top-``k`` hits of ``gallery`` for a connected-space query row."""
        return self.gallery(gallery).search(q, k)

    # -------------------------------------------------------------------------- localisation
    def localizer(self) -> Any | None:
        """A :class:`cmcr.localize.Localizer` over this service's open_clip ViT image encoder (built once), or
        ``None`` when no query encoder is an open_clip ViT of a connector side's images."""
        if not hasattr(self, "_localizer"):
            from cmcr.localize import Localizer

            self._localizer = None
            for enc, sides in self.encoders:
                if "image" in sides and getattr(enc, "family", None) == "open_clip":
                    try:
                        self._localizer = Localizer(self.connector, enc, None)
                    except CmcrError as e:  # a ResNet tower: search works, localisation does not
                        log.info("no localisation: %s", e)
                    break
        return self._localizer

    def localize(self, data: bytes, filename: str, gallery: str, key: str) -> tuple[bytes, dict[str, Any]]:
        """Where the uploaded sound's source is in the image ``key`` of ``gallery``: a PNG overlay (image +
        colour map + colour bar, :func:`cmcr.localize.overlay_png`) and the heatmap's summary.

        Raises:
            InputDataError: no localiser (no open_clip ViT image encoder), a gallery that is not of images,
                an unknown key or a row without a media file, or a query the other side cannot embed.
        """
        from cmcr.localize import overlay_png

        loc = self.localizer()
        if loc is None:
            raise InputDataError("localisation needs an open_clip ViT image encoder of a connector side "
                                 "(start cmcr serve with -e open_clip:ViT-...)")
        g = self.gallery(gallery)
        if g.modality != "image":
            raise InputDataError(f"gallery {gallery} holds {g.modality}, not images: nothing to localise in")
        path = g.media_path(key)
        if path is None:
            raise InputDataError(f"no media file for key {key!r} in gallery {gallery!r}")
        q, info = self.embed_media(data, filename, side="B" if loc.image_side == "A" else "A")
        if info["side"] == loc.image_side:
            raise InputDataError(f"{filename}: a query of the image side; localise a sound (the other side's media)")
        with self._forward:  # an image forward: shares the encoder slots with media queries
            m = loc.localize(path, q)
            png = overlay_png(path, m.heatmap, title=f"{filename} in {key}", random_weights=bool(self.random_weights()))
        return png, {**m.summary(), "query": info, "key": key, "gallery": gallery}


_FAISS_THREADS: dict[str, int | None] = {"n": None}  # set by set_threads; applied per calling thread
_faiss_pinned = threading.local()


def set_threads(n: int) -> None:
    """Threads of one torch forward pass and one FAISS search (process-wide), ``n >= 1``.

    torch's setting and numpy's BLAS (OpenBLAS, through ``threadpoolctl``) are process-wide, but OpenMP's
    (FAISS) belongs to the thread that sets it: a request thread of the HTTP server would otherwise search
    with every core, the idle ones spin-waiting. Measured on 2 cores, 100k-row gallery (``bench_serve.py``,
    process CPU per search including the spin-waits): the exact shortlist from a request thread 33.2 ms
    without the FAISS count, 18.4 ms with it; with numpy's BLAS on every core 129.5 ms, held to 1 thread
    20.4 ms (an HNSW search runs one query on one thread either way). :func:`pin_search_threads` applies
    the FAISS count in a request thread.

    Raises:
        InputDataError: ``n < 1``.
    """
    import faiss
    import threadpoolctl
    import torch

    if n < 1:
        raise InputDataError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    threadpoolctl.threadpool_limits(limits=n, user_api="blas")
    _FAISS_THREADS["n"] = n
    _faiss_pinned.n = n


def pin_search_threads() -> None:
    """Apply :func:`set_threads`'s FAISS thread count in the calling thread (OpenMP's count is per thread;
    a no-op when it is unset or already applied in this thread)."""
    n = _FAISS_THREADS["n"]
    if n is not None and getattr(_faiss_pinned, "n", None) != n:
        import faiss

        faiss.omp_set_num_threads(n)
        _faiss_pinned.n = n


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _safe_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "gallery"
    return out


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


def render_points_png(points: np.ndarray, size: int = 256, max_points: int = 4096, up_axis: str = "y") -> bytes:
    """A PNG preview of a point cloud: an orthographic view from 30° azimuth / 20° elevation, far points
    drawn first, coloured by the cloud's rgb or shaded by depth.

    Args:
        points: ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb in [0, 1], float; any scale (centred and scaled here).
        size: image width and height (pixels).
        max_points: draw at most this many points (an even subsample, deterministic).
        up_axis: ``y`` (ShapeNet/Objaverse/glTF convention) or ``z``.

    Returns:
        PNG file bytes.
    """
    import io

    from PIL import Image, ImageDraw

    pts = np.asarray(points, dtype=np.float32)
    if len(pts) > max_points:
        pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(int)]
    xyz = pts[:, :3] - pts[:, :3].mean(axis=0)
    xyz /= max(float(np.linalg.norm(xyz, axis=1).max()), 1e-9)
    if up_axis == "y":  # y-up (ShapeNet, Objaverse, glTF) -> z-up
        xyz = xyz[:, [0, 2, 1]] * np.array([1, -1, 1], np.float32)
    az, el = np.radians(30.0), np.radians(20.0)
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]], np.float32)
    rot_x = np.array([[1, 0, 0], [0, np.cos(el), -np.sin(el)], [0, np.sin(el), np.cos(el)]], np.float32)
    v = xyz @ rot_z.T @ rot_x.T  # x right, y depth, z up
    order = np.argsort(-v[:, 1])  # far first
    img = Image.new("RGB", (size, size), (233, 236, 243))
    draw = ImageDraw.Draw(img)
    half = size / 2
    depth = (v[:, 1] - v[:, 1].min()) / max(float(np.ptp(v[:, 1])), 1e-9)
    r = max(1.0, size / 160)
    for i in order:
        x, y = half + v[i, 0] * half * 0.9, half - v[i, 2] * half * 0.9
        if pts.shape[1] >= 6:
            c = tuple(int(255 * float(np.clip(ch, 0, 1))) for ch in pts[i, 3:6])
        else:
            shade = 1.0 - 0.6 * float(depth[i])
            c = (int(47 * shade), int(91 * shade), int(211 * shade))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=c)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
