"""quantization/llm_quality.py on a generated tiny snapshot and a real speech clip: the study runs end to end and
what must hold does (F32 vs itself is exactly 0, metrics in range, every row present). Tiny widths are not
multiples of 256, so K-quants fall back to legacy types there and no ordering between variants is asserted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kimia_edge.export.snapshot.make import make_snapshot
from kimia_edge.quantization.llm_quality import MIN_STEPS, kld_rows, main

VARIANTS = ["F32", "F16", "Q8_0", "Q4_K_M"]


def test_kld_rows_matches_the_closed_form():
    p, q = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    want = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    got = kld_rows(np.log(p)[None] + 3.0, np.log(q)[None] - 1.0)  # logits: any shift per row
    assert got[0] == pytest.approx(want, rel=1e-12)
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    assert np.array_equal(kld_rows(x, x.copy()), np.zeros(3))
    with pytest.raises(ValueError, match="expected shape"):
        kld_rows(x, x[:, :10])


def test_study_on_tiny(tmp_path: Path, shared_audio: Path, capsys):
    snap = make_snapshot(tmp_path / "tiny", "tiny", seed=4)
    out = tmp_path / "report"
    assert main([str(snap), "--clip", str(shared_audio / "qa_example.wav"), "--work", str(tmp_path / "gguf"),
                 "--threads", "1", "--variants", *VARIANTS, "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    table = out.with_suffix(".md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert report["fed_steps"] == MIN_STEPS and report["positions_per_head"] == MIN_STEPS + 1
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == VARIANTS and all(f"| {name} |" in table for name in VARIANTS)
    for head in ("text", "audio"):
        f32 = rows["F32"]["heads"][head]
        assert (f32["mean_kld"], f32["p99_kld"], f32["top1_agreement"]) == (0.0, 0.0, 1.0)
        for r in rows.values():
            h = r["heads"][head]
            assert h["positions"] == MIN_STEPS + 1
            assert np.isfinite(h["mean_kld"]) and h["mean_kld"] >= 0.0 and h["p99_kld"] >= 0.0
            assert 0.0 <= h["top1_agreement"] <= 1.0
    assert rows["F16"]["weight_bytes"] < rows["F32"]["weight_bytes"]
    assert rows["Q8_0"]["weight_bytes"] < rows["F16"]["weight_bytes"]
    assert "Q8_0" in rows["Q8_0"]["tensor_types"] and "F32" in rows["F32"]["tensor_types"]
    assert not any((tmp_path / "gguf" / "Q8_0").glob("*.gguf"))  # quantized files removed after measuring
