"""Project stores into the connected space and evaluate retrieval / zero-shot classification.

Library API (used by ``cmcr project`` / ``cmcr eval`` and the demo)::

    conn = Connector.load("runs/clip-clap")
    audio = project_store(conn, "st/esc50_audio", "st/esc50_audio.cmcr")      # side B, indexed
    image = project_store(conn, "st/vggss_image", "st/vggss_image.cmcr")      # side A
    report = evaluate_retrieval(audio, image, by="key")       # audio->image R@1/5/10, mAP, chance
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import ConfigError, InputDataError, StoreMismatchError
from cmcr.stores.files import claim_output, locks_output
from cmcr.stores.store import Store, canonical_json, comparable_identity
from cmcr.trainer.connector import Connector, same_space
from cmcr.trainer.data import as_store
from cmcr.trainer.metrics import DEFAULT_KS, retrieval_metrics, zeroshot_accuracy

log = logging.getLogger(__name__)

#: The note printed next to any figure computed from random-init encoder weights.
RANDOM_WEIGHTS_NOTE = "random weights: not meaningful"


@locks_output("out_path")
def project_store(
    connector: Connector | str | os.PathLike,
    store: Store | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    batch_rows: int = 65536,
    index: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
) -> Store:
    """Map every row of ``store`` into the connected space and write a new store (plus its FAISS index).

    The side is chosen from the store's encoder identity and modality. The output store keeps the
    keys, metadata columns and modality; its encoder identity is
    :meth:`Connector.projected_identity` (names the connector fingerprint, the side and the base
    identity), so it can never be mistaken for a raw store. One part per input batch: a rerun
    resumes.

    Args:
        connector: a :class:`Connector` or its folder.
        store: the store to project (e.g. CLAP audio embeddings).
        out_path: output store folder.
        batch_rows: rows per part.
        index: build the FAISS index (``cmcr.stores.index.build_index``) when done.
        overwrite: start the output store over, whatever it holds (the one meaning of ``--overwrite``);
            without it a projection by the same connector of the same store is resumed, another is refused.

    Returns:
        The projected :class:`Store` (float32, cosine).

    Raises:
        ConnectorError: no side of the connector accepts the store's encoder and modality.
        StoreMismatchError: ``out_path`` holds another projection and ``overwrite`` is False (the
            message names what differs: connector, side, source store).
    """
    conn = connector if isinstance(connector, Connector) else Connector.load(connector)
    src = as_store(store)
    side = conn.side_for(src.encoder, src.modality)
    identity = conn.projected_identity(side, src.encoder)
    extra = {"projected": {"connector": conn.fingerprint, "connector_path": str(conn.path), "side": side,
                           "source_store": str(src.path), "source_fingerprint": src.fingerprint()}}
    out_path = Path(out_path)
    provenance = {"connector": conn.fingerprint, "side": side, "source_store": src.fingerprint(),
                  "source_encoder": comparable_identity(src.encoder)}
    with claim_output(out_path, kind="projection", provenance=provenance, overwrite=overwrite,
                      recorded=_recorded_projection, error=StoreMismatchError):
        out = Store.open_or_create(out_path, modality=src.modality, encoder=identity, dim=conn.out_dim,
                                   dtype="float32", preprocessing=src.preprocessing, extra=extra)
    done = out.done_sources()
    columns = src.metadata_columns
    pos = 0
    for batch in src.iter_batches(batch_size=batch_rows, columns=columns, dtype=np.float32):
        source = f"rows:{pos}-{pos + len(batch.keys)}"
        pos += len(batch.keys)
        if source in done:
            continue
        z = conn.project(side, batch.embeddings, identity=src.encoder, modality=src.modality, device=device)
        out.append_part(batch.keys, z, metadata=batch.metadata if columns else None, source=source)
    if index and out.num_rows:
        build_store_index(out)
    return out


def _recorded_projection(path: Path) -> dict[str, Any] | None:
    """The provenance of the projected store at ``path`` (``None``: no store there), as
    :func:`project_store` compares it: connector fingerprint, side, source store fingerprint and encoder."""
    if not (path / "manifest.json").exists():
        return None
    old = Store.open(path, validate="none")
    p = (old.manifest.get("extra") or {}).get("projected") or {}
    base = old.encoder.get("base") if isinstance(old.encoder.get("base"), dict) else None
    return {"connector": p.get("connector"), "side": p.get("side"), "source_store": p.get("source_fingerprint"),
            "source_encoder": comparable_identity(base) if base is not None else None}


def build_store_index(store: Store) -> dict[str, Any] | None:
    """Build the store's FAISS index with :func:`cmcr.stores.index.build_index`; returns its info,
    or ``None`` (with a warning) when the index module is not available."""
    try:
        from cmcr.stores.index import build_index
    except ImportError:  # the index module is built by another part of the project
        log.warning("cmcr.stores.index is not available: %s was written without a FAISS index", store.path)
        return None
    return build_index(store)


def _base_identities(identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The raw encoder identities behind ``identity`` (a projected identity nests its raw one under ``base``)."""
    base = identity.get("base")
    return _base_identities(base) if isinstance(base, Mapping) else [dict(identity)]


def _connector_side_identities(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Encoder identities recorded by the sides of the connector in ``folder`` (``[]`` when unreadable)."""
    try:
        meta = json.loads((Path(folder) / "connector.json").read_text())
        return [dict(side["encoder"]) for side in meta["sides"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def random_weight_identities(*sources: Store | Connector | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The encoder identities behind ``sources`` whose ``weights`` start with ``random`` (random-init
    encoders: any figure computed from them is not meaningful).

    Args:
        sources: stores (a projected store counts its base encoder and both sides of the connector
            recorded in its manifest), connectors (both sides' encoders) or encoder identity dicts.

    Returns:
        The distinct random-weight identities, in order of appearance (``[]``: none).
    """
    found: list[dict[str, Any]] = []
    for src in sources:
        if isinstance(src, Connector):
            idents = [side.encoder for side in src.sides.values()]
        elif isinstance(src, Store):
            idents = _base_identities(src.encoder)
            projected = (src.manifest.get("extra") or {}).get("projected") or {}
            if projected.get("connector_path"):
                idents += _connector_side_identities(projected["connector_path"])
        else:
            idents = _base_identities(src)
        for ident in idents:
            if str(ident.get("weights", "")).startswith("random") and ident not in found:
                found.append(dict(ident))
    return found


def describe_identity(identity: Mapping[str, Any]) -> str:
    """``family:architecture@weights`` of an encoder identity (for notes and messages)."""
    return f"{identity.get('family')}:{identity.get('architecture')}@{identity.get('weights')}"


def check_same_space(query: Store, gallery: Store) -> None:
    """Raise :class:`StoreMismatchError` unless the two stores' embeddings can be compared by cosine
    (projected by the same connector, or raw from the same encoder)."""
    if not same_space(query.encoder, gallery.encoder):
        raise StoreMismatchError(
            f"{query.path} ({canonical_json(query.encoder)}) and {gallery.path} ({canonical_json(gallery.encoder)}) "
            f"live in different embedding spaces; project both with the same connector (`cmcr project`) first"
        )


def evaluate_retrieval(
    query_store: Store | str | os.PathLike,
    gallery_store: Store | str | os.PathLike,
    *,
    by: str = "key",
    label_column: str = "label",
    ks: tuple[int, ...] = DEFAULT_KS,
) -> dict[str, Any]:
    """Cosine retrieval from every row of ``query_store`` into ``gallery_store``.

    Args:
        by: ``"key"`` (the positive is the gallery row with the query's key) or ``"label"``
            (positives are the gallery rows with the query's ``label_column`` value).
        ks: the k of recall@k.

    Returns:
        :func:`cmcr.trainer.metrics.retrieval_metrics` output plus ``direction``
        (``"audio->image"``), ``positives_by``, ``query_store``, ``gallery_store``, ``random_weights``
        (True when an encoder behind either store, or behind the connector that projected it, has
        random-init weights: see :func:`random_weight_identities`).

    Raises:
        StoreMismatchError: the stores live in different spaces.
        StoreFormatError: ``by="label"`` and a store lacks ``label_column``.
        ConfigError: ``by`` is neither ``key`` nor ``label``.
        InputDataError: no query has a positive in the gallery (unpaired stores: use ``by="label"``).
    """
    q, g = as_store(query_store), as_store(gallery_store)
    check_same_space(q, g)
    if by == "key":
        ql, gl = q.keys(), g.keys()
    elif by == "label":
        ql = q.metadata([label_column]).column(label_column).to_pylist()
        gl = g.metadata([label_column]).column(label_column).to_pylist()
    else:
        raise ConfigError(f"--by must be 'key' or 'label', got {by!r}")
    result = retrieval_metrics(q.embeddings(np.float32), g.embeddings(np.float32), ql, gl, ks=ks)
    if result["queries"] == 0:
        hint = ("the stores share no key: they hold different samples. Pair them by class with --by label "
                f"(a `{label_column}` column in both)" if by == "key" else
                f"no query's `{label_column}` value appears in the gallery; check the label columns")
        raise InputDataError(f"retrieval {q.path} -> {g.path}: none of the {len(ql)} queries has a positive in the "
                             f"gallery ({hint}); nothing to score")
    result.update({"direction": f"{q.modality}->{g.modality}", "positives_by": by if by == "key" else
                   f"label:{label_column}", "query_store": str(q.path), "gallery_store": str(g.path),
                   "random_weights": bool(random_weight_identities(q, g))})
    return result


def evaluate_zeroshot(
    store: Store | str | os.PathLike,
    class_embeddings: np.ndarray,
    class_names: list[str],
    *,
    label_column: str = "label",
) -> dict[str, Any]:
    """Zero-shot accuracy of a projected store against projected class-prompt embeddings.

    Args:
        store: projected store with a ``label_column`` of class names.
        class_embeddings: ``(C, D_out)`` unit rows in the same connected space (prompts through the
            text encoder of one side, then that side's projector).
        class_names: C names.

    Returns:
        :func:`cmcr.trainer.metrics.zeroshot_accuracy` output plus ``store`` and ``modality``.
    """
    s = as_store(store)
    labels = [str(x) for x in s.metadata([label_column]).column(label_column).to_pylist()]
    out = zeroshot_accuracy(s.embeddings(np.float32), labels, class_embeddings, class_names)
    out.update({"store": str(s.path), "modality": s.modality})
    return out


#: Bundled prompt-template sets (ULIP's ``data/templates.json``: ``modelnet40_64``, ``shapenet_64``) and
#: class-name lists (ULIP's ``data/labels.json``: ``modelnet40``); see ``cmcr/data/ulip/README.md``.
BUNDLED_PROMPTS = "data/ulip/templates.json"
BUNDLED_CLASSES = "data/ulip/labels.json"


def _bundled_json(name: str) -> dict[str, list[str]]:
    from importlib import resources

    return json.loads(resources.files("cmcr").joinpath(name).read_text(encoding="utf-8"))


def bundled_template_sets() -> dict[str, list[str]]:
    """Named prompt-template sets shipped with cmcr (``modelnet40_64``: ULIP's 64 ModelNet40 prompts)."""
    return _bundled_json(BUNDLED_PROMPTS)


def bundled_class_lists() -> dict[str, list[str]]:
    """Named class-name lists shipped with cmcr (``modelnet40``: the 40 ModelNet40 classes, ULIP's order)."""
    return _bundled_json(BUNDLED_CLASSES)


def load_templates(spec: str) -> list[str]:
    """Prompt templates from a bundled set name (``modelnet40_64``), a JSON file (a list, or a dict with
    one list) or a text file with one template per line; every template holds one ``{}``.

    Raises:
        ConfigError: unknown name, unreadable file, or a template without ``{}`` (names it).
    """
    sets = bundled_template_sets()
    p = Path(spec)
    if spec in sets and not p.exists():
        templates = sets[spec]
    elif p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--templates {spec}: cannot be read as UTF-8 text ({e})") from e
        if p.suffix.lower() == ".json":
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--templates {spec}: invalid JSON ({e})") from e
            if isinstance(doc, dict) and len(doc) == 1:
                doc = next(iter(doc.values()))
            if not (isinstance(doc, list) and all(isinstance(t, str) for t in doc)):
                raise ConfigError(f"--templates {spec}: expected a JSON list of template strings (or a dict "
                                  f"with one such list)")
            templates = doc
        else:
            templates = [t.strip() for t in text.splitlines() if t.strip()]
    else:
        raise ConfigError(f"--templates {spec}: neither a bundled template set ({', '.join(sorted(sets))}) nor "
                          f"an existing file (JSON list or one template per line)")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ConfigError(f"--templates {spec}: every template needs exactly one '{{}}' for the class name"
                          + (f"; not so: {bad[:3]}" if bad else "; none given"))
    return list(templates)


def average_prompt_embeddings(embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class prompt ensemble: ``(C * T, D)`` rows ordered class by class (T templates each) ->
    ``(C, D)`` float32: the mean of the L2-normalised rows of each class, L2-normalised again (as ULIP's
    ``test_zeroshot_3d_core`` and CLIP's prompt ensembling do).

    Raises:
        ValueError: the row count is not a multiple of ``n_classes``.
    """
    e = np.asarray(embeddings, np.float32)
    if n_classes < 1 or e.shape[0] % n_classes:
        raise ValueError(f"{e.shape[0]} prompt rows cannot be split evenly into {n_classes} classes")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m = e.reshape(n_classes, e.shape[0] // n_classes, e.shape[1]).mean(axis=1)
    return (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(np.float32)
