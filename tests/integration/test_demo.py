"""`vitdeploy demo` end to end (few epochs: the table and the build matter here, not the accuracy)."""
from vitdeploy.cli import main


def test_demo_prints_fp32_vs_int8_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| FP32") or line.startswith("| INT8")]
    assert len(lines) == 2
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        top1, size_mb, latency_ms = float(cells[1]), float(cells[2]), float(cells[3])
        assert 0.0 <= top1 <= 100.0 and size_mb > 0 and latency_ms > 0
    assert (tmp_path / "digits_vit" / "model.int8.onnx").is_file()
    assert (tmp_path / "demo-inputs" / "digits_vit.pt").is_file()
