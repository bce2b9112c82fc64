"""Counterfactual audio-image recognition (one of the C-MCR paper's audio-visual tasks; docs/tasks.md).

Does a sound belong to an image at all? Every (audio, image) pair is scored by the cosine of its two
embeddings in the connected space, and the scores are judged against matched / mismatched labels:
average precision and max-F1 over the decision threshold, with their chance levels, overall and per
class.

Protocols (where the labelled pairs come from):

* ``pairs``: a file of labelled pairs (CSV or JSONL: audio key, image key, label 0/1, optional class)
  -- e.g. VGG-SS-style "source not visible" negatives, or any hand-made set.
* ``shuffled``: the audio and image stores share keys (one key = one video / true pair); every shared
  key gives a matched pair, and ``negatives`` seeded derangements of the images give the mismatched
  ones (audio i with image pi(i), pi(i) != i; with ``different_class`` also of another class).
* ``label``: every (audio, image) combination of the two stores, matched when their labels are equal
  (for stores that hold different samples, like the bundled media).

Library API::

    report = evaluate_counterfactual("st/vggss_audio.cmcr", "st/vggss_image.cmcr", protocol="shuffled")
    report["AP"], report["chance"]["AP"], report["per_class"]["dog"]["AP"]
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import ConfigError, ConnectorError, InputDataError, StoreMismatchError
from cmcr.stores.store import Store, canonical_json
from cmcr.trainer.connector import Connector, is_projected, same_space
from cmcr.trainer.data import as_store
from cmcr.trainer.evaluate import random_weight_identities
from cmcr.trainer.metrics import chance_ap
from cmcr.trainer.tasks import average_precision, max_f1, max_f1_floor

log = logging.getLogger(__name__)

PROTOCOLS = ("pairs", "shuffled", "label")

#: The ``label`` protocol scores the whole audio x image cross product; above this many pairs it asks
#: for the shuffled protocol or a pairs file instead.
MAX_CROSS_PAIRS = 4_000_000

_AUDIO_COLUMNS = ("audio", "audio_key")
_IMAGE_COLUMNS = ("image", "image_key")
_LABEL_COLUMNS = ("label", "matched")
_CLASS_COLUMNS = ("class", "category")
_TRUE = {"1", "true", "yes", "matched", "match", "positive"}
_FALSE = {"0", "false", "no", "mismatched", "mismatch", "negative"}


@dataclass
class PairsFile:
    """The labelled pairs of a pairs file, by key (:func:`read_pairs_file`).

    Attributes:
        audio_keys, image_keys: N keys each.
        labels: ``(N,)`` bool, True = matched.
        classes: N class names (``None`` where a row names none), or ``None`` when no row names a class.
        info: ``{"protocol": "pairs", "pairs_file", "pairs_in_file"}``.
    """

    audio_keys: list[str]
    image_keys: list[str]
    labels: np.ndarray
    classes: list[str | None] | None
    info: dict[str, Any]


@dataclass
class LabelledPairs:
    """Labelled (audio, image) pairs as store rows, ready to score.

    Attributes:
        audio_rows, image_rows: ``(N,)`` int64 row numbers in the audio and the image store.
        labels: ``(N,)`` bool, True = matched.
        class_codes: ``(N,)`` int64 index into ``class_names`` (-1: no class), or ``None`` when the
            protocol has no classes.
        class_names: the class vocabulary.
        info: protocol details for the report (counts of dropped pairs, seed, ...).
    """

    audio_rows: np.ndarray
    image_rows: np.ndarray
    labels: np.ndarray
    class_codes: np.ndarray | None
    class_names: list[str]
    info: dict[str, Any]


# ------------------------------------------------------------------------------------- pairs file


def _parse_label(value: Any, where: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InputDataError(f"{where}: label is {value!r}; expected 1/0 (or true/false, matched/mismatched)")


def _pick(fields: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in fields), None)


def read_pairs_file(path: str | os.PathLike) -> PairsFile:
    """Read labelled pairs from a CSV (header row) or JSONL file (one object per line).

    Columns / fields: ``audio`` (or ``audio_key``), ``image`` (or ``image_key``), ``label`` (or
    ``matched``: 1/0, true/false, matched/mismatched), optional ``class`` (or ``category``). A
    ``.json`` file holding a list of such objects is read too.

    Returns:
        :class:`PairsFile` (``classes`` is ``None`` when no row names a class).

    Raises:
        InputDataError: unreadable file, missing columns, or a malformed row (named with its number).
    """
    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"--pairs {p}: file not found")
    rows: list[tuple[dict[str, Any], str]] = []
    suffix = p.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            text = p.read_text(encoding="utf-8")
            if suffix == ".json":
                doc = json.loads(text)
                if not isinstance(doc, list):
                    raise InputDataError(f"{p}: expected a JSON list of pair objects")
                rows = [(r, f"{p} entry {i}") for i, r in enumerate(doc)]
            else:
                for n, line in enumerate(text.splitlines(), start=1):
                    if line.strip():
                        rows.append((json.loads(line), f"{p} line {n}"))
        elif suffix in (".csv", ".tsv"):
            with open(p, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                reader.fieldnames = [c.strip().lower() for c in (reader.fieldnames or [])]
                rows = [(r, f"{p} row {n}") for n, r in enumerate(reader, start=2)]
        else:
            raise InputDataError(f"{p}: unknown pairs file type {suffix!r}; give a .csv or .jsonl file with columns "
                                 f"audio,image,label[,class] (docs/tasks.md)")
    except json.JSONDecodeError as e:
        raise InputDataError(f"{p}: invalid JSON ({e})") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputDataError(f"{p}: cannot be read ({e})") from e
    if not rows:
        raise InputDataError(f"{p}: no pairs")
    audio, image, labels, classes = [], [], [], []
    for row, where in rows:
        if not isinstance(row, dict):
            raise InputDataError(f"{where}: expected an object with audio, image, label; found {row!r:.80}")
        fields = [str(k).strip().lower() for k in row]
        row = {str(k).strip().lower(): v for k, v in row.items()}
        a, i, lab = _pick(fields, _AUDIO_COLUMNS), _pick(fields, _IMAGE_COLUMNS), _pick(fields, _LABEL_COLUMNS)
        if a is None or i is None or lab is None:
            raise InputDataError(f"{where}: needs fields audio, image and label (1 = matched, 0 = mismatched); has "
                                 f"{fields}")
        ak, ik = str(row[a] if row[a] is not None else "").strip(), str(row[i] if row[i] is not None else "").strip()
        if not ak or not ik:
            raise InputDataError(f"{where}: empty audio or image key")
        audio.append(ak)
        image.append(ik)
        labels.append(_parse_label(row[lab], where))
        c = _pick(fields, _CLASS_COLUMNS)
        cv = row.get(c) if c else None
        classes.append(str(cv).strip() if cv not in (None, "") else None)
    has_class = any(c is not None for c in classes)
    return PairsFile(audio, image, np.array(labels, dtype=bool), classes if has_class else None,
                     {"protocol": "pairs", "pairs_file": str(p), "pairs_in_file": len(rows)})


# ------------------------------------------------------------------------------- generated protocols


def derangement(n: int, rng: np.random.Generator, classes: Sequence[Any] | None = None,
                image_classes: Sequence[Any] | None = None, *, tries: int = 64) -> np.ndarray:
    """A seeded random permutation ``pi`` of ``range(n)`` with ``pi[i] != i`` (and, when classes are
    given, ``image_classes[pi[i]] != classes[i]``).

    A random permutation is repaired by random swaps that make both swapped entries valid; entries that
    cannot be repaired after ``tries`` attempts (e.g. a class holding more than half the items) get
    ``-1``.

    Returns:
        ``(n,)`` int64, ``-1`` where no valid partner was found.
    """
    perm = rng.permutation(n).astype(np.int64)
    ca = ci = None
    if classes is not None:
        ca, ci = (np.asarray(c) for c in _codes(classes, image_classes if image_classes is not None else classes))

    def ok(i: int, j: int) -> bool:
        return i != j and (ca is None or ca[i] != ci[j])

    for i in range(n):
        if ok(i, perm[i]):
            continue
        for _ in range(tries):
            j = int(rng.integers(n))
            if ok(i, perm[j]) and ok(j, perm[i]):
                perm[i], perm[j] = perm[j], perm[i]
                break
    bad = np.array([not ok(i, perm[i]) for i in range(n)], dtype=bool)
    perm[bad] = -1
    return perm


def _codes(a: Sequence[Any], b: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Integer codes of two label sequences over one vocabulary (``None`` gets its own code)."""
    vocab: dict[Any, int] = {}
    return ([vocab.setdefault(x, len(vocab)) for x in a], [vocab.setdefault(x, len(vocab)) for x in b])


def _labels_of(store: Store, column: str) -> list[Any] | None:
    if column not in store.metadata_columns:
        return None
    return [None if x in (None, "") else str(x) for x in store.metadata([column]).column(column).to_pylist()]


def _class_codes(*label_lists: list[Any] | None) -> tuple[list[np.ndarray | None], list[str]]:
    """Integer codes (-1 for ``None``) of several label lists over one vocabulary, and the vocabulary."""
    vocab: dict[str, int] = {}
    out: list[np.ndarray | None] = []
    for labels in label_lists:
        if labels is None:
            out.append(None)
            continue
        out.append(np.array([-1 if x is None else vocab.setdefault(x, len(vocab)) for x in labels], dtype=np.int64))
    return out, list(vocab)


def shuffled_pairs(audio: Store, image: Store, *, negatives: int = 1, seed: int = 0, different_class: bool = False,
                   label_column: str = "label") -> LabelledPairs:
    """The shuffled-pair protocol: shared keys are the matched pairs; ``negatives`` seeded
    derangements of the images give the mismatched ones (duplicates across rounds dropped).

    Pair classes (when the audio store has ``label_column``): the audio's label.

    Raises:
        InputDataError: the stores share fewer than 2 keys.
        ConfigError: ``different_class`` without a label column in both stores; ``negatives`` < 1.
    """
    if negatives < 1:
        raise ConfigError(f"--negatives must be >= 1, got {negatives}")
    akeys = audio.keys()
    ikeys = image.keys()
    image_row = {k: r for r, k in enumerate(ikeys)}
    shared = [(r, image_row[k]) for r, k in enumerate(akeys) if k in image_row]
    n = len(shared)
    if n < 2:
        raise InputDataError(f"{audio.path} and {image.path} share {n} key(s): the shuffled-pair protocol needs true "
                             f"pairs with one key per (audio, image) pair. For stores of different samples use "
                             f"--protocol label (matched = same label), or give --pairs FILE")
    a_rows = np.array([a for a, _ in shared], dtype=np.int64)
    i_rows = np.array([i for _, i in shared], dtype=np.int64)
    a_lab, i_lab = _labels_of(audio, label_column), _labels_of(image, label_column)
    if different_class and (a_lab is None or i_lab is None):
        raise ConfigError(f"--different-class needs a `{label_column}` column in both stores "
                          f"({audio.path}: {'yes' if a_lab is not None else 'no'}, "
                          f"{image.path}: {'yes' if i_lab is not None else 'no'})")
    (a_codes, i_codes), names = _class_codes(a_lab, i_lab)
    pair_a_cls = a_codes[a_rows] if a_codes is not None else None
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    neg_a: list[int] = []
    neg_i: list[int] = []
    unmatched = duplicates = 0
    for _ in range(negatives):
        perm = derangement(n, rng, pair_a_cls.tolist() if different_class else None,
                           i_codes[i_rows].tolist() if different_class else None)
        for i, j in enumerate(perm.tolist()):
            if j < 0:
                unmatched += 1
            elif (i, j) in seen:
                duplicates += 1
            else:
                seen.add((i, j))
                neg_a.append(i)
                neg_i.append(j)
    if unmatched:
        log.warning("shuffled protocol: %d of %d audio rows found no valid mismatched image%s", unmatched,
                    n * negatives, " of another class" if different_class else "")
    a_idx = np.r_[np.arange(n), np.array(neg_a, dtype=np.int64)]
    i_idx = np.r_[np.arange(n), np.array(neg_i, dtype=np.int64)]
    labels = np.r_[np.ones(n, bool), np.zeros(len(neg_a), bool)]
    return LabelledPairs(a_rows[a_idx], i_rows[i_idx], labels,
                         pair_a_cls[a_idx] if pair_a_cls is not None else None, names,
                         {"protocol": "shuffled", "seed": seed, "negatives_per_positive": negatives,
                          "negatives_of": "another class" if different_class else "any other pair",
                          "shared_keys": n, "keys_only_in_audio": len(akeys) - n,
                          "keys_only_in_image": len(ikeys) - n, "negatives_without_partner": unmatched,
                          "duplicate_negatives_dropped": duplicates})


def label_pairs(audio: Store, image: Store, *, label_column: str = "label",
                max_pairs: int = MAX_CROSS_PAIRS) -> LabelledPairs:
    """The label protocol: every (audio, image) combination, matched when the labels are equal.

    Rows without a label are left out (counted). Pair class: the audio's label.

    Raises:
        ConfigError: a store lacks ``label_column``, or the cross product exceeds ``max_pairs``.
    """
    a_lab, i_lab = _labels_of(audio, label_column), _labels_of(image, label_column)
    missing = [str(s.path) for s, lab in ((audio, a_lab), (image, i_lab)) if lab is None]
    if missing:
        raise ConfigError(f"--protocol label needs a `{label_column}` metadata column; missing in {', '.join(missing)} "
                          f"(choose the column with --label-column)")
    (a_codes, i_codes), names = _class_codes(a_lab, i_lab)
    a_rows = np.flatnonzero(a_codes >= 0)
    i_rows = np.flatnonzero(i_codes >= 0)
    empty = [f"{s.path} ({s.modality})" for s, rows in ((audio, a_rows), (image, i_rows)) if not len(rows)]
    if empty:
        raise InputDataError(f"--protocol label: no row of {', '.join(empty)} has a `{label_column}` value (a caption "
                             f"store has none); give the two labelled stores to compare, e.g. audio and images")
    if len(a_rows) * len(i_rows) > max_pairs:
        raise ConfigError(f"--protocol label would score {len(a_rows)} x {len(i_rows)} = {len(a_rows) * len(i_rows)} "
                          f"pairs (limit {max_pairs}); use --protocol shuffled (stores with shared keys) or "
                          f"--pairs FILE")
    aa = np.repeat(a_rows, len(i_rows))
    ii = np.tile(i_rows, len(a_rows))
    return LabelledPairs(aa, ii, a_codes[aa] == i_codes[ii], a_codes[aa], names,
                         {"protocol": "label", "label_column": label_column, "audio_rows": len(a_rows),
                          "image_rows": len(i_rows), "audio_rows_without_label": len(a_lab) - len(a_rows),
                          "image_rows_without_label": len(i_lab) - len(i_rows)})


def file_pairs(audio: Store, image: Store, pairs: PairsFile) -> tuple[LabelledPairs, dict[str, Any]]:
    """The pairs of a pairs file as store rows; pairs whose key is not in its store are left out.

    Returns:
        ``(pairs, skipped)``; ``skipped`` is ``{}`` or ``{"pairs_with_missing_key", "audio_keys_missing",
        "image_keys_missing", "examples"}``.
    """
    ua, ui = sorted(set(pairs.audio_keys)), sorted(set(pairs.image_keys))
    have_a, have_i = audio.keys_present(ua), image.keys_present(ui)
    a_row = dict(zip(have_a, audio.rows_of(have_a).tolist(), strict=True)) if have_a else {}
    i_row = dict(zip(have_i, image.rows_of(have_i).tolist(), strict=True)) if have_i else {}
    keep = np.array([a in a_row and i in i_row for a, i in zip(pairs.audio_keys, pairs.image_keys, strict=True)],
                    dtype=bool)
    skipped: dict[str, Any] = {}
    if not keep.all():
        miss_a = [k for k in ua if k not in a_row]
        miss_i = [k for k in ui if k not in i_row]
        skipped = {"pairs_with_missing_key": int((~keep).sum()), "audio_keys_missing": len(miss_a),
                   "image_keys_missing": len(miss_i), "examples": miss_a[:3] + miss_i[:3]}
        log.warning("%s: %d pair(s) skipped, their key is not in the store (audio e.g. %s; image e.g. %s)",
                    pairs.info.get("pairs_file"), int((~keep).sum()), miss_a[:3], miss_i[:3])
    idx = np.flatnonzero(keep)
    aa = np.array([a_row[pairs.audio_keys[k]] for k in idx], dtype=np.int64)
    ii = np.array([i_row[pairs.image_keys[k]] for k in idx], dtype=np.int64)
    codes, names = None, []
    if pairs.classes is not None:
        (codes,), names = _class_codes([pairs.classes[k] for k in idx])
    return LabelledPairs(aa, ii, pairs.labels[idx], codes, names, pairs.info), skipped


# ------------------------------------------------------------------------------------------ scoring


def connected_embeddings(store: Store, rows: np.ndarray, connector: Connector | None) -> np.ndarray:
    """The embeddings of ``rows`` of ``store`` in the connected space: ``(len(rows), D)`` float32 unit rows.

    A projected store (``cmcr project``) is read as is (it must come from ``connector`` when one is
    given); a raw store is projected through the connector side that accepts it.

    Raises:
        ConnectorError: a raw store without a connector, or a store projected by another connector.
    """
    emb = store.embeddings_of(rows, np.float32)
    if is_projected(store.encoder):
        if connector is not None and store.encoder.get("connector") != connector.fingerprint:
            raise ConnectorError(f"{store.path} was projected by connector {store.encoder.get('connector')}, not by "
                                 f"{connector.path or connector.fingerprint} ({connector.fingerprint}); give the raw "
                                 f"store, or the connector that projected it")
        z = emb
    elif connector is not None:
        side = connector.side_for(store.encoder, store.modality)
        z = connector.project(side, emb, identity=store.encoder, modality=store.modality)
    else:
        z = emb
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.maximum(norms, 1e-12)).astype(np.float32)


def _check_space(audio: Store, image: Store, connector: Connector | None) -> None:
    if connector is not None:
        for s in (audio, image):
            if not is_projected(s.encoder):
                connector.side_for(s.encoder, s.modality)  # raises ConnectorError naming the accepted encoders
        return
    if not same_space(audio.encoder, image.encoder):
        raw = [str(s.path) for s in (audio, image) if not is_projected(s.encoder)]
        hint = (f"pass --connector to project the raw store(s) {', '.join(raw)}" if raw else
                "project both with the same connector (`cmcr project`)")
        raise StoreMismatchError(f"{audio.path} ({canonical_json(audio.encoder)}) and {image.path} "
                                 f"({canonical_json(image.encoder)}) live in different embedding spaces; {hint}")


def score_pairs(audio: Store, image: Store, audio_rows: np.ndarray, image_rows: np.ndarray,
                connector: Connector | None = None) -> np.ndarray:
    """Cosine of each (audio row, image row) pair in the connected space: ``(N,)`` float64.

    Each distinct row is read (and projected) once, whatever the number of pairs it is in.
    """
    ua, inv_a = np.unique(np.asarray(audio_rows, dtype=np.int64), return_inverse=True)
    ui, inv_i = np.unique(np.asarray(image_rows, dtype=np.int64), return_inverse=True)
    za = connected_embeddings(audio, ua, connector)
    zi = connected_embeddings(image, ui, connector)
    out = np.empty(len(inv_a), dtype=np.float64)
    block = 1 << 20
    for start in range(0, len(out), block):  # bounded memory for millions of pairs
        sl = slice(start, start + block)
        out[sl] = np.einsum("nd,nd->n", za[inv_a[sl]], zi[inv_i[sl]])
    return out


def binary_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """AP, max-F1 (and its threshold) with chance levels, for one set of scored pairs.

    Chance: ``AP`` = :func:`cmcr.trainer.metrics.chance_ap` (the expected AP of a random ranking of
    these pairs; about the positive rate), ``max_F1`` = ``2p / (1 + p)`` (calling every pair matched,
    which max-F1 never falls below), ``positive_rate`` = p.

    Returns:
        ``{"pairs", "matched", "mismatched", "positive_rate", "AP", "max_F1", "threshold",
        "mean_score": {"matched", "mismatched"}, "chance": {"AP", "max_F1", "positive_rate"}}``; AP and
        max-F1 are ``None`` when one of the two kinds of pair is absent.
    """
    n, pos = int(len(labels)), int(labels.sum())
    p = pos / n if n else float("nan")
    out: dict[str, Any] = {"pairs": n, "matched": pos, "mismatched": n - pos, "positive_rate": p}
    out["mean_score"] = {"matched": float(scores[labels].mean()) if pos else None,
                         "mismatched": float(scores[~labels].mean()) if n - pos else None}
    if pos and n - pos:
        out["AP"] = average_precision(scores, labels)
        out["max_F1"], out["threshold"] = max_f1(scores, labels)
    else:
        out["AP"] = out["max_F1"] = out["threshold"] = None
    out["chance"] = {"AP": float(chance_ap(n, np.array([pos]))[0]) if pos else None,
                     "max_F1": max_f1_floor(p) if pos else None, "positive_rate": p}
    return out


def evaluate_counterfactual(
    audio_store: Store | str | os.PathLike,
    image_store: Store | str | os.PathLike,
    *,
    connector: Connector | str | os.PathLike | None = None,
    protocol: str = "shuffled",
    pairs_file: str | os.PathLike | None = None,
    negatives: int = 1,
    different_class: bool = False,
    seed: int = 0,
    label_column: str = "label",
) -> dict[str, Any]:
    """Counterfactual audio-image recognition: score labelled (audio, image) pairs by their cosine in
    the connected space; AP and max-F1 with chance levels, overall and per class.

    Args:
        audio_store, image_store: projected stores (``cmcr project``), or raw stores with ``connector``
            (or two raw stores of one encoder: no connector, a baseline in that encoder's own space).
        connector: projects raw stores (the side is chosen from each store's encoder and modality).
        protocol: ``"pairs"`` (``pairs_file``), ``"shuffled"`` (shared keys vs seeded derangements) or
            ``"label"`` (cross product, matched = same label). See the module docstring.
        negatives: shuffled: derangement rounds, i.e. mismatched pairs per matched pair.
        different_class: shuffled: negatives only between different ``label_column`` values.
        seed: shuffled: generator seed (recorded).
        label_column: metadata column of class labels (protocols ``shuffled`` -- optional -- and ``label``).

    Returns:
        :func:`binary_report` of all pairs plus ``protocol`` details, ``per_class`` (``{class:
        binary_report}``, when the pairs have classes), ``classes_scored`` (classes with both kinds of
        pair), ``skipped`` (pairs-file rows whose key is not in a store), ``audio_store``,
        ``image_store``, ``connector``, ``random_weights`` (True when an encoder behind the stores or
        the connector has random-init weights: the numbers are not meaningful).

    Raises:
        ConfigError: unknown protocol, or options that do not fit it.
        InputDataError: no usable pairs, or the pairs hold only one kind (matched or mismatched).
        StoreMismatchError / ConnectorError: the stores cannot be compared in one space.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if (protocol == "pairs") != (pairs_file is not None):
        raise ConfigError("--protocol pairs goes with --pairs FILE (and --pairs only with it)")
    if protocol != "shuffled" and (different_class or negatives != 1):
        raise ConfigError("--negatives and --different-class belong to --protocol shuffled")
    a, i = as_store(audio_store), as_store(image_store)
    conn = None
    if connector is not None:
        conn = connector if isinstance(connector, Connector) else Connector.load(connector)
    if a.modality == i.modality:
        raise ConfigError(f"{a.path} and {i.path} both hold {a.modality} embeddings; counterfactual recognition "
                          f"scores pairs of two modalities (e.g. an audio store and an image store)")
    _check_space(a, i, conn)
    skipped: dict[str, Any] = {}
    if protocol == "pairs":
        lp, skipped = file_pairs(a, i, read_pairs_file(pairs_file))
        if not len(lp.labels):
            raise InputDataError(f"{pairs_file}: none of the pairs has both keys in {a.path} and {i.path} (are these "
                                 f"the right stores? pair keys are the stores' row keys)")
    elif protocol == "shuffled":
        lp = shuffled_pairs(a, i, negatives=negatives, seed=seed, different_class=different_class,
                            label_column=label_column)
    else:
        lp = label_pairs(a, i, label_column=label_column)
    if lp.labels.all() or not lp.labels.any():
        kind = "matched" if lp.labels.all() else "mismatched"
        raise InputDataError(f"all {len(lp.labels)} pairs are {kind}: AP and F1 need both matched and mismatched "
                             f"pairs ({lp.info.get('pairs_file') or 'protocol ' + protocol})")
    scores = score_pairs(a, i, lp.audio_rows, lp.image_rows, conn)
    report = binary_report(scores, lp.labels)
    report["protocol"] = lp.info
    if lp.class_codes is not None:
        per_class: dict[str, Any] = {}
        order = np.argsort(lp.class_codes, kind="stable")
        codes = lp.class_codes[order]
        bounds = np.flatnonzero(np.diff(codes)) + 1
        for group in np.split(order, bounds):
            code = int(lp.class_codes[group[0]])
            name = lp.class_names[code] if code >= 0 else "(none)"
            per_class[name] = binary_report(scores[group], lp.labels[group])
        report["per_class"] = dict(sorted(per_class.items()))
        report["classes_scored"] = sum(1 for r in per_class.values() if r["AP"] is not None)
    report.update({"skipped": skipped, "audio_store": str(a.path), "image_store": str(i.path),
                   "connector": str(conn.path) if conn is not None else None,
                   "random_weights": bool(random_weight_identities(a, i, *([conn] if conn else [])))})
    return report
