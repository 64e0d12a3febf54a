"""The benchmark script runs on a tiny case and writes its report (timings are benchmark figures, not tests)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_writes_report(results_dir, tmp_path):
    out = tmp_path / 'report'
    p = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'run.py'), '--quick', '--no-old-tool',
                        '--out', str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads((out / 'results.json').read_text())
    row = data['rows'][0]
    assert row['predict']['rc'] == 0 and row['ours']['rc'] == 0
    assert row['ratio_vs_predict'] > 0 and row['ours']['tiles'] > 1 and row['ours']['peak_rss_mb'] > 0
    assert 'skipped' in row['old_tool']['error']
    assert len(data['scaling']) == 2 and data['scaling'][1]['tiles'] > data['scaling'][0]['tiles']
    assert (out / 'scaling.png').stat().st_size > 0
    assert '| tiny 3d_fullres | bottleneck | gradcam |' in (out / 'report.md').read_text()
