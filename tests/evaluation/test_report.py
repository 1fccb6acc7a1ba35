"""Clip-range report: a real PNG, a correct summary, outliers flagged."""
import random

import pytest

from amct_hf.cli import main
from amct_hf.evaluation.report import layer_clip_stats, plot_report
from amct_hf.record.files import write_kv_factors

mpimg = pytest.importorskip("matplotlib.image")

OUTLIER = "model.layers.2.self_attn.k_proj"


def make_record(path, n_layers=4, channels=16, seed=0):
    rng = random.Random(seed)
    factors = {}
    # Written in reverse layer order: the report must still order by layer index.
    for i in reversed(range(n_layers)):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            c = 1 if (i, proj) == (1, "v_proj") else channels  # one per-tensor layer
            scales = [rng.uniform(0.02, 0.04) for _ in range(c)]
            offsets = [rng.randint(-20, 20) for _ in range(c)]
            if name == OUTLIER:
                scales[5] = 10 * max(scales)  # one channel with a 10x range
            factors[name] = (scales, offsets)
    write_kv_factors(path, factors)
    return factors


def check_png(path):
    img = mpimg.imread(str(path))
    h, w = img.shape[:2]
    assert w > 400 and h > 300
    assert img.var() > 0


def test_report_png_and_summary(tmp_path):
    rec = tmp_path / "kv.txt"
    make_record(rec)
    out = tmp_path / "plots" / "report.png"
    summary = plot_report(rec, out, title="test report")
    check_png(out)

    assert summary["outliers"] == [OUTLIER]
    layers = summary["layers"]
    assert len(layers) == 8
    assert [v["index"] for v in layers.values()] == [0, 0, 1, 1, 2, 2, 3, 3]
    s = layers[OUTLIER]
    assert s["outlier"] and s["worst_channel"] == 5 and s["range_ratio"] > 4
    assert s["kind"] == "key" and s["channels"] == 16
    per_tensor = layers["model.layers.1.self_attn.v_proj"]
    assert per_tensor["channels"] == 1 and per_tensor["range_ratio"] == 1 and not per_tensor["outlier"]
    for name, v in layers.items():
        assert v["min_clip"] < 0 < v["max_clip"]  # offsets near 0: the range straddles 0
        assert v["outlier"] == (name == OUTLIER)


def test_clip_stats_follow_spec_convention():
    st = layer_clip_stats([0.5, 0.25], [-10, 3])
    assert st["x_min"] == [(-128 + 10) * 0.5, (-128 - 3) * 0.25]
    assert st["x_max"] == [(127 + 10) * 0.5, (127 - 3) * 0.25]
    assert st["min_clip"] == -59.0 and st["max_clip"] == 68.5
    assert st["median_range"] == (255 * 0.5 + 255 * 0.25) / 2 and st["worst_channel"] == 0


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        plot_report(tmp_path / "missing.txt", tmp_path / "r.png")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        plot_report(empty, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_cli_report(tmp_path, capsys):
    rec = tmp_path / "kv.txt"
    make_record(rec, n_layers=2)
    out = tmp_path / "cli.png"
    rc = main(["report", "--record", str(rec), "--out", str(out)])
    assert rc == 0
    check_png(out)
    captured = capsys.readouterr()
    assert str(out) in captured.out and "4 K/V entries" in captured.out

    rc = main(["report", "--record", str(tmp_path / "nope.txt"), "--out", str(out)])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err


def test_per_tensor_record_gets_no_channel_panel(tmp_path, capsys):
    per_tensor = tmp_path / "pt.txt"
    write_kv_factors(per_tensor, {f"model.layers.{i}.self_attn.{p}_proj": ([0.01 * (i + 1)], [3])
                                  for i in range(4) for p in "kv"})
    per_channel = tmp_path / "pc.txt"
    make_record(per_channel)
    heights = {}
    for rec in (per_tensor, per_channel):
        out = tmp_path / f"{rec.stem}.png"
        summary = plot_report(rec, out)
        heights[rec.stem] = mpimg.imread(str(out)).shape[0]
    # two clip panels against two plus the widest/median channel panel: 2 / 3 of the height
    assert heights["pt"] * 3 == heights["pc"] * 2
    assert summary["layers"]
    assert main(["report", "--record", str(per_tensor), "--out", str(tmp_path / "x.png")]) == 0
    assert "outlier" not in capsys.readouterr().out  # no channel statistics to judge
