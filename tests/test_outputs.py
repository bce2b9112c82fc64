"""The derived-output protocol (cmcr.stores.files.claim_output), issue 13 design step: every writer
reuses a matching output, refuses another one naming the differing fields, starts over with
``--overwrite``, and refuses a concurrent writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmcr.errors import ConfigError, OutputLockedError, StoreMismatchError
from cmcr.stores.files import claim_output, output_lock, provenance_differences
from tests.test_files import Holder


def test_provenance_differences_name_nested_fields() -> None:
    diffs = provenance_differences({"a": 1, "enc": {"arch": "ViT-B-32", "dim": 512}, "gone": 1},
                                   {"a": 1, "enc": {"arch": "ViT-L-14", "dim": 512}, "new": [1, 2]})
    assert diffs == ["enc.arch: recorded 'ViT-B-32', now 'ViT-L-14'", "gone: recorded 1, now (none)",
                     "new: recorded (none), now [1,2]"]
    assert provenance_differences({"x": 1}, {"x": 1}) == []
    many = provenance_differences({f"k{i}": i for i in range(10)}, {}, limit=3)
    assert len(many) == 4 and many[-1] == "... and 7 more"


def test_claim_new_reuse_refuse_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with claim_output(out, kind="thing", provenance={"lr": 0.1, "seed": 0}, record="rec.json") as c:
        assert not c.reuse and not c.started_over
        (out / "result.bin").write_bytes(b"x")
        c.publish()
    with claim_output(out, kind="thing", provenance={"seed": 0, "lr": 0.1}, record="rec.json") as c:
        assert c.reuse and c.recorded == {"lr": 0.1, "seed": 0}
    with pytest.raises(StoreMismatchError) as e:
        with claim_output(out, kind="thing", provenance={"lr": 0.2, "seed": 0}, record="rec.json",
                          error=StoreMismatchError, hint="resume needs the same lr"):
            pass
    msg = str(e.value)
    assert "lr: recorded 0.1, now 0.2" in msg and "--overwrite" in msg and "resume needs the same lr" in msg
    assert "seed" not in msg and (out / "result.bin").exists()  # refused before anything was touched
    with claim_output(out, kind="thing", provenance={"lr": 0.2}, record="rec.json", overwrite=True) as c:
        assert c.started_over and not c.reuse
        assert not (out / "result.bin").exists() and not (out / "rec.json").exists()
        c.publish()
    assert (out / "rec.json").read_text().strip().startswith("{")


def test_foreign_folder_refused_even_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"not empty and holds no demo run \(thesis.tex\)"):
            with claim_output(out, kind="demo run", provenance={}, record="r.json", foreign=("release",),
                              overwrite=overwrite):
                pass
    assert (out / "thesis.tex").read_text() == "keep me"


def test_concurrent_claim_refused_and_shared_claims_coexist(tmp_path: Path) -> None:
    out = tmp_path / "store"
    with Holder(out):
        with pytest.raises(OutputLockedError):
            with claim_output(out, kind="store", provenance={}, shared=True):
                pass
    # shared writers (encode runs appending to one store) coexist; a start-over is refused meanwhile
    with output_lock(out, shared=True):
        import subprocess
        import sys

        code = ("import sys\nfrom cmcr.stores.files import output_lock\nfrom cmcr.errors import OutputLockedError\n"
                "try:\n    with output_lock(sys.argv[1], shared=sys.argv[2] == '1'):\n        print('ok')\n"
                "except OutputLockedError as e:\n    print('refused', e)\n")
        shared = subprocess.run([sys.executable, "-c", code, str(out), "1"], capture_output=True, text=True)
        exclusive = subprocess.run([sys.executable, "-c", code, str(out), "0"], capture_output=True, text=True)
        assert shared.stdout.startswith("ok"), shared.stderr
        assert exclusive.stdout.startswith("refused") and "shared writers" in exclusive.stdout
    with claim_output(out, kind="store", provenance={}, overwrite=True):  # free again
        pass
