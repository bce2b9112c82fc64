"""Localisation and counterfactual metrics, annotation readers (trainer/tasks.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from cmcr.errors import InputDataError
from cmcr.trainer.metrics import chance_ap
from cmcr.trainer.tasks import (
    BoxAnnotation,
    average_precision,
    boxes_to_mask,
    centre_prior,
    ciou,
    consensus_map,
    localization_auc,
    max_f1,
    max_f1_floor,
    read_box_annotations,
    success_rate,
)

# ------------------------------------------------------------------------------------------ boxes


def test_boxes_to_mask_integer_boxes_are_slices():
    m = boxes_to_mask(np.array([[2, 1, 5, 4]]), 6, 8)
    want = np.zeros((6, 8), bool)
    want[1:4, 2:5] = True  # LVS: temp[ymin:ymax, xmin:xmax] = 1
    assert (m == want).all()
    # fractional corners: pixel centres decide; boxes are clipped to the image
    m2 = boxes_to_mask([[1.6, -3, 100, 0.4]], 6, 8)
    assert not m2.any()
    m3 = boxes_to_mask([[1.4, -3, 100, 0.6]], 6, 8)
    assert m3[0, 1:].all() and not m3[0, 0] and not m3[1:].any()
    assert not boxes_to_mask(np.zeros((0, 4)), 3, 3).any()
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        boxes_to_mask([[1, 2, 3]], 4, 4)


def test_consensus_map_flickr_rule():
    # three annotators; two overlap on columns 2..3 -> full weight there, 0.5 where only one marked
    boxes = [[0, 0, 4, 1], [2, 0, 6, 1], [7, 0, 8, 1]]
    g = consensus_map(boxes, 1, 8, consensus=2)
    assert g[0].tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5, 0.0, 0.5]
    assert consensus_map(boxes, 1, 8)[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 1]


# ------------------------------------------------------------------------------------------ cIoU


def _box_gt(h=20, w=30):
    g = np.zeros((h, w), bool)
    g[5:12, 8:20] = True
    return g


def test_ciou_perfect_and_inverted():
    g = _box_gt()
    perfect = g.astype(np.float32) * 3.0 - 1.0  # any scale: min-max normalised
    assert ciou(perfect, g) == pytest.approx(1.0)
    assert ciou(-perfect, g) == 0.0
    assert ciou(np.zeros_like(perfect), g) == 0.0  # constant map -> nothing active at tau 0.5


def test_ciou_known_value_and_consensus():
    g = np.zeros((4, 4))
    g[0, :2] = 1.0
    g[1, :2] = 0.5  # one annotator only
    heat = np.zeros((4, 4))
    heat[0, :] = 1.0  # active: row 0 -> 2 gt pixels (weight 1) + 2 background
    # cIoU = (1 + 1) / (sum(g) = 3 + 2 background actives) = 2/5
    assert ciou(heat, g) == pytest.approx(2 / 5)
    # the perfect heatmap of a consensus map is the map itself
    assert ciou(g, g) == pytest.approx(1.0)


def test_ciou_median_protocol_takes_top_half():
    g = np.zeros((4, 4), bool)
    g[:2, :] = True  # top half annotated
    heat = np.linspace(1, 0, 16).reshape(4, 4) ** 3  # decreasing down the rows: top half is the top 8
    assert ciou(heat, g, threshold="median") == pytest.approx(1.0)
    # a peaky map: at tau 0.5 only the first few pixels are active, with the median the top half
    assert ciou(heat, g, threshold=0.5) == pytest.approx(4 / 8)  # values 1, .81, .65, .51 of 8 gt pixels
    with pytest.raises(ValueError, match="median"):
        ciou(heat, g, threshold="mean")
    with pytest.raises(ValueError, match="empty"):
        ciou(heat, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        ciou(heat, np.ones((3, 4)))


def test_centre_prior_on_centred_and_corner_boxes():
    h, w = 40, 60
    p = centre_prior(h, w)
    assert p.shape == (h, w) and p.dtype == np.float32
    assert np.unravel_index(np.argmax(p), p.shape) in {(19, 29), (19, 30), (20, 29), (20, 30)}
    assert np.allclose(p, p[::-1, ::-1])  # symmetric
    centred = boxes_to_mask([[w * 0.3, h * 0.3, w * 0.7, h * 0.7]], h, w)
    corner = boxes_to_mask([[0, 0, w * 0.25, h * 0.25]], h, w)
    assert ciou(p, centred) > 0.5
    assert ciou(p, corner) == 0.0
    # median protocol: the central half of the image, all of a centred box inside it
    assert ciou(p, centred, threshold="median") > 0.3


# ------------------------------------------------------------------------------------------- AUC


def test_localization_auc_known_lists():
    assert localization_auc([1.0, 1.0]) == pytest.approx(1.0)
    assert localization_auc([0.0, 0.0]) == pytest.approx(0.025)  # only t=0 succeeds: half a trapezoid of 0.05
    # one sample at 0.5: success 1 for t <= 0.5 (11 points), then 0 -> 0.5 + 0.025
    assert localization_auc([0.5]) == pytest.approx(0.525)
    # mixed: the mean of the single-sample curves (the curve is linear in the samples)
    assert localization_auc([0.5, 1.0, 0.0]) == pytest.approx((0.525 + 1.0 + 0.025) / 3)
    # mean cIoU is approximately the AUC for a spread of values
    rng = np.random.default_rng(0)
    c = rng.uniform(size=5000)
    assert localization_auc(c) == pytest.approx(c.mean(), abs=0.03)
    assert success_rate([0.2, 0.5, 0.7, 0.49]) == 0.5
    with pytest.raises(ValueError):
        localization_auc([])


# ---------------------------------------------------------------------------------- AP and max-F1


def _ap_reference(scores, labels):
    """Brute force: precision at every distinct threshold times the recall it adds."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = (pred & labels).sum()
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return ap


def _f1_reference(scores, labels):
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    best = (-1.0, None)
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0]:
            best = (f1, t)
    return best


def test_ap_and_f1_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 0, 1, 0, 0]
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3) / 2)
    f1, thr = max_f1(scores, labels)
    # threshold 0.9: P 1 R .5 F1 2/3; threshold 0.7: P 2/3 R 1 F1 0.8
    assert f1 == pytest.approx(0.8) and thr == 0.7
    assert average_precision([1, 1, 0], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)  # ties enter together
    assert average_precision([3, 2, 1], [True, True, False]) == 1.0
    assert max_f1_floor(0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="positive"):
        average_precision([1, 2], [0, 0])
    with pytest.raises(ValueError, match="0/1"):
        max_f1([1, 2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([np.nan, 1], [0, 1])


def test_ap_f1_match_brute_force_on_random_tied_scores():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        assert average_precision(scores, labels) == pytest.approx(_ap_reference(scores, labels))
        f1, thr = max_f1(scores, labels)
        rf1, rthr = _f1_reference(scores, labels)
        assert f1 == pytest.approx(rf1) and thr == rthr
        assert f1 >= max_f1_floor(labels.mean()) - 1e-12


def test_ap_of_random_scores_matches_chance_ap():
    # the chance level reported next to AP: the exact expectation over random rankings
    n, pos = 6, 2
    labels = np.array([1] * pos + [0] * (n - pos))
    aps = [average_precision(-np.array(perm, float), labels) for perm in itertools.permutations(range(n))]
    assert np.mean(aps) == pytest.approx(chance_ap(n, np.array([pos]))[0])


# ------------------------------------------------------------------------------------ annotations


def test_read_vggss_json(tmp_path):
    doc = [{"file": "zpWuikVorYg_000032", "class": "elk bugling", "bbox": [[0.403125, 0.253125, 0.6, 0.75]]},
           {"file": "ORaz32CQ29k_000130", "class": "coyote howling",
            "bbox": [[0.121875, 0.171875, 0.6, 0.853125], [-0.01, 0.275, 0.984375, 1.02]]}]
    p = tmp_path / "vggss.json"
    p.write_text(json.dumps(doc))
    ann = read_box_annotations(p)
    assert set(ann) == {"zpWuikVorYg_000032", "ORaz32CQ29k_000130"}
    a = ann["ORaz32CQ29k_000130"]
    assert a.label == "coyote howling" and a.frame == (1.0, 1.0) and a.consensus == 1
    assert a.boxes.shape == (2, 4) and a.boxes.min() >= 0 and a.boxes.max() <= 1  # clipped as LVS does
    px = ann["zpWuikVorYg_000032"].pixel_boxes(200, 320)
    assert px[0] == pytest.approx([0.403125 * 320, 0.253125 * 200, 0.6 * 320, 0.75 * 200])
    g = a.gt_map(224, 224)
    assert g.dtype == np.float32 and set(np.unique(g)) <= {0.0, 1.0}  # union
    # JSONL and {key: boxes}
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(d) for d in doc))
    assert set(read_box_annotations(tmp_path / "a.jsonl")) == set(ann)
    (tmp_path / "m.json").write_text(json.dumps({"k": [[0.1, 0.1, 0.5, 0.5]]}))
    assert read_box_annotations(tmp_path / "m.json")["k"].boxes.shape == (1, 4)


def test_read_vggss_json_errors_name_the_entry(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"file": "a", "bbox": [[0.1, 0.1, 0.5, 0.5]]},
                             {"file": "b", "bbox": [[0.5, 0.1, 0.2, 0.4]]}]))
    with pytest.raises(InputDataError, match=r"bad.json entry 1 box 0: .*inverted"):
        read_box_annotations(p)
    assert set(read_box_annotations(p, strict=False)) == {"a"}  # non-strict: skipped
    p.write_text(json.dumps([{"file": "a", "bbox": [[10, 10, 50, 50]]}]))
    with pytest.raises(InputDataError, match=r"entry 0: coordinates above 1 .*width"):
        read_box_annotations(p)
    p.write_text(json.dumps([{"name": "a"}]))
    with pytest.raises(InputDataError, match=r"entry 0: needs 'file'"):
        read_box_annotations(p)
    p.write_text("{not json")
    with pytest.raises(InputDataError, match="invalid JSON"):
        read_box_annotations(p)
    p.write_text(json.dumps([{"file": "a", "bbox": [[0, 0, 1, 1]]}, {"file": "a", "bbox": [[0, 0, 1, 1]]}]))
    with pytest.raises(InputDataError, match="appears twice"):
        read_box_annotations(p)


FLICKR_XML = """<annotation>
  <file>{stem}.jpg</file>
  <object><bbox><id>0</id><xmin>10</xmin><ymin>20</ymin><xmax>128</xmax><ymax>200</ymax></bbox></object>
  <object><bbox><a>1</a><b>30</b><c>40</c><d>140</d><e>210</e></bbox></object>
  <object><bbox><a>2</a><b>0</b><c>0</c><d>256</d><e>256</e></bbox></object>
</annotation>
"""


def test_read_flickr_xml_folder(tmp_path):
    d = tmp_path / "Annotations"
    d.mkdir()
    (d / "10000130166.xml").write_text(FLICKR_XML.format(stem="10000130166"))
    (d / "10007936344.xml").write_text(FLICKR_XML.format(stem="10007936344"))
    (d / "notes.txt").write_text("ignored")
    ann = read_box_annotations(d)
    assert sorted(ann) == ["10000130166", "10007936344"]
    a = ann["10000130166"]
    assert a.frame == (256.0, 256.0) and a.consensus == 2
    assert a.boxes.tolist() == [[10, 20, 128, 200], [30, 40, 140, 210], [0, 0, 256, 256]]
    g = a.gt_map(256, 256)
    assert g[0, 0] == 0.5 and g[100, 50] == 1.0  # one annotator vs three
    assert a.pixel_boxes(512, 128)[0].tolist() == [5, 40, 64, 400]
    # one file; a PASCAL-VOC-style file with a size element is read in its pixel frame, union
    voc = tmp_path / "img7.xml"
    voc.write_text("<annotation><size><width>640</width><height>480</height></size><object><bndbox><xmin>1</xmin>"
                   "<ymin>2</ymin><xmax>300</xmax><ymax>400</ymax></bndbox></object></annotation>")
    v = read_box_annotations(voc)["img7"]
    assert v.frame == (640.0, 480.0) and v.consensus == 1


def test_read_flickr_xml_errors(tmp_path):
    d = tmp_path / "ann"
    d.mkdir()
    (d / "good.xml").write_text(FLICKR_XML.format(stem="good"))
    (d / "bad.xml").write_text("<annotation><object><bbox><id>0</id><x>ten</x><y>1</y><x>2</x><y>3</y></bbox>"
                               "</object></annotation>")
    with pytest.raises(InputDataError, match=r"bad.xml box 0: coordinate 0 is 'ten'"):
        read_box_annotations(d)
    assert set(read_box_annotations(d, strict=False)) == {"good"}
    (d / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(InputDataError, match="bad.xml: not a readable XML"):
        read_box_annotations(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match="no .xml"):
        read_box_annotations(empty)


def test_read_cmcr_csv(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text("key,x0,y0,x1,y1,label\n"
                 "dog_1,10,20,50,60,dog\n"
                 "dog_1,55,20,70,60,dog\n"
                 "cat_3,0,0,5,5,\n")
    ann = read_box_annotations(p)
    assert ann["dog_1"].boxes.shape == (2, 4) and ann["dog_1"].label == "dog" and ann["dog_1"].frame is None
    assert ann["cat_3"].label is None
    assert ann["dog_1"].pixel_boxes(100, 100).tolist() == [[10, 20, 50, 60], [55, 20, 70, 60]]
    # width/height give the frame (1,1 = fractions); consensus column
    p2 = tmp_path / "frac.csv"
    p2.write_text("file,xmin,ymin,xmax,ymax,width,height,consensus\nk,0.25,0.25,0.75,0.75,1,1,2\n")
    a = read_box_annotations(p2)["k"]
    assert a.frame == (1.0, 1.0) and a.consensus == 2
    assert a.gt_map(8, 8)[2:6, 2:6].tolist() == [[0.5] * 4] * 4
    with pytest.raises(InputDataError, match="outside the 10x10 image"):
        ann["dog_1"].pixel_boxes(10, 10)


def test_read_cmcr_csv_errors_name_the_row(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text("key,x0,y0,x1,y1\na,1,2,3,4\nb,1,2,x,4\nb,1,2,3,4\nc,5,5,6,6\n")
    with pytest.raises(InputDataError, match=r"boxes.csv row 3: coordinate 2 is 'x'"):
        read_box_annotations(p)
    assert set(read_box_annotations(p, strict=False)) == {"a", "c"}  # key b dropped whole
    p.write_text("name,left,top\na,1,2\n")
    with pytest.raises(InputDataError, match="header with key,x0,y0,x1,y1"):
        read_box_annotations(p)
    p.write_text("key,x0,y0,x1,y1,width,height\na,1,2,3,4,10,10\na,1,2,3,4,20,10\n")
    with pytest.raises(InputDataError, match="row 3: width/height/consensus differ"):
        read_box_annotations(p)
    with pytest.raises(InputDataError, match="not found"):
        read_box_annotations(tmp_path / "nope.json")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputDataError, match="unknown annotation layout"):
        read_box_annotations(tmp_path / "x.txt")


def test_box_annotation_gt_map_drives_ciou():
    a = BoxAnnotation(np.array([[0.25, 0.25, 0.75, 0.75]]), (1.0, 1.0))
    g = a.gt_map(32, 48)
    assert g.sum() == 16 * 24
    assert ciou(g, g) == 1.0 and ciou(1 - g, g) == 0.0


# ------------------------------------------------------------ localisation-aware detection (SLAVC)


def _slavc_pr(has, cious, conf, thr, ciou_thr=0.5):
    """SLAVC utils.EvaluatorFull.calc_precision_recall, transcribed."""
    tp = fp = fn = 0
    for h, c, s in zip(has, cious, conf, strict=True):
        if not h:
            fp += s >= thr
        elif s >= thr:
            tp += c >= ciou_thr
            fp += c < ciou_thr
        else:
            fn += 1
    return (1.0 if tp + fp == 0 else tp / (tp + fp)), (1.0 if tp + fn == 0 else tp / (tp + fn))


def test_source_detection_metrics_match_slavc_counting():
    from cmcr.trainer.tasks import heatmap_confidence, source_detection_metrics

    # hand example: confidences .9 (good), .8 (no source), .7 (mislocalised), .6 (good), .5 (no source)
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    cious = [0.8, 0.0, 0.2, 0.6, 0.0]
    has = [1, 0, 1, 1, 0]
    m = source_detection_metrics(conf, cious, has)
    # t=.9: P 1 R 1/3 | t=.8: P 1/2 R 1/3 | t=.7: P 1/3 R 1/2 | t=.6: P 1/2 R 1 | t=.5: P 2/5 R 1
    # interpolated P: 1, 1/2, 1/2, 1/2, 2/5 -> AP = 1/3*1 + 0 + (1/2-1/3)*1/2 + (1-1/2)*1/2
    assert m["AP"] == pytest.approx(1 / 3 + 1 / 12 + 1 / 4)
    assert m["max_F1"] == pytest.approx(2 / 3) and m["threshold"] == 0.6  # P 1/2 R 1
    assert m["pairs"] == 5 and m["with_source"] == 3
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = 30
        has = rng.random(n) < 0.6
        has[0] = True
        conf = rng.integers(0, 8, n) / 8.0
        cious = rng.random(n)
        m = source_detection_metrics(conf, cious, has)
        pts = [_slavc_pr(has, cious, conf, t) for t in sorted(set(conf.tolist()), reverse=True)]
        f1 = max(2 * p * r / (p + r) if p + r else 0.0 for p, r in pts)
        assert m["max_F1"] == pytest.approx(f1)
    assert heatmap_confidence(np.arange(8.0).reshape(2, 4)) == pytest.approx(6.5)  # mean of the top 2 of 8
    with pytest.raises(ValueError, match="no pair has a visible source"):
        source_detection_metrics([0.5], [0.0], [0])
