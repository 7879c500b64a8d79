"""benchmarks/attention.py: the SF forward+backward table puts wall time, GPU time and host time side by side, each
ratio from its own columns."""

import json
from types import SimpleNamespace

from tests.launch import load_benchmark


def test_sf_host_split_table(tmp_path, monkeypatch):
    bench = load_benchmark("attention")
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "test GPU")
    row = {"Hq": 32, "Hkv": 32, "S": 4096}
    row.update(ours_sf_fwd=0.16, ours_sf_fwdbwd=0.95, ours_sf_fwdbwd_graph=0.64, ours_sf_fwdbwd_host_us=900.0)
    row.update(flex_sf_fwd=0.16, flex_sf_fwdbwd=0.70, flex_sf_fwdbwd_graph=0.68, flex_sf_fwdbwd_host_us=250.0)
    no_split = {"Hq": 32, "Hkv": 32, "S": 16384, "ours_sf_fwdbwd": 2.0, "flex_sf_fwdbwd": 2.0}
    bench.write(SimpleNamespace(out=str(tmp_path), argv=["--seq", "4096"]), [row, no_split], 1.0)
    table = (tmp_path / "attention.md").read_text().split("## SF forward+backward")[1]
    lines = [line for line in table.splitlines() if line.startswith("| 32/32")]
    assert lines == ["| 32/32 | 4096 | 0.95 / 0.64 / 900 | 0.70 / 0.68 / 250 | 0.74 | 1.06 |"]
    assert json.loads((tmp_path / "attention.json").read_text())["rows"][0]["ours_sf_fwdbwd_host_us"] == 900.0
