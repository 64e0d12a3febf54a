"""Segmentation + CAM against `nnUNetv2_predict_from_modelfolder` alone and against `nnunetv2-cam` 0.1.6.1.

One command, one run, same model, case, device and TTA for all three:

    python benchmarks/run.py                       # tiny 3D and 2D models (built if absent), CPU
    python benchmarks/run.py --quick               # a small case and the main rows only (what the tests run)
    python benchmarks/gpu_ct.py                    # the CT-sized GPU case (model and data made in the script)

Each row is a whole process (imports, loading, preprocessing, tiles, export) timed with /usr/bin/time: wall time,
peak RSS (of the largest single process) and tiles/s. Writes report.md, results.json and scaling.png to --out.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

BIN = Path(sys.executable).parent
OLD_TOOL = 'nnunetv2-cam==0.1.6.1'


def gpu_memory_used_mb() -> Optional[float]:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=memory.used', '--format=csv,noheader,nounits', '-i', '0'],
                             capture_output=True, text=True, timeout=5).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def timed(cmd, env=None) -> dict:
    """Whole-process wall time and peak RSS via GNU time; on a GPU machine also the peak GPU memory the process
    added (nvidia-smi sampled every 0.2 s, so any tool is measured the same way)."""
    base = gpu_memory_used_mb()
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.2):
            used = gpu_memory_used_mb()
            peak[0] = max(peak[0], (used or 0.0) - base)
    sampler = threading.Thread(target=sample, daemon=True) if base is not None else None
    if sampler:
        sampler.start()
    with tempfile.NamedTemporaryFile('r', suffix='.time') as t:
        p = subprocess.run(['/usr/bin/time', '-f', '%e %M', '-o', t.name, *map(str, cmd)], env=env,
                           capture_output=True, text=True)
        wall, rss_kb = open(t.name).read().split()[-2:]
    done.set()
    out = {'wall_s': float(wall), 'peak_rss_mb': round(int(rss_kb) / 1024, 1), 'rc': p.returncode,
           'error': None if p.returncode == 0 else (p.stderr.strip().splitlines() or ['?'])[-1][:300]}
    if sampler:
        sampler.join()
        out['peak_gpu_mb'] = round(peak[0], 1)
    return out


def old_tool_python(cache: Path):
    """nnunetv2-cam 0.1.6.1 in its own venv; it shares this venv's torch/nnU-Net through a .pth (no 5 GB copy).
    Where this Python already has it (a machine without a package index, given the wheel), this Python."""
    from importlib import metadata
    try:
        if metadata.version('nnunetv2-cam') == OLD_TOOL.split('==')[1]:
            return Path(sys.executable), None
    except metadata.PackageNotFoundError:
        pass
    venv = cache / 'venv-nnunetv2-cam-0.1.6.1'
    py = venv / 'bin' / 'python'
    if not (venv / '.complete').is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
        site = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                              capture_output=True, text=True, check=True).stdout.strip()
        ours = subprocess.run([sys.executable, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, 'shared-torch.pth').write_text(ours + '\n')
        r = subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-deps', OLD_TOOL], capture_output=True,
                           text=True)
        if r.returncode != 0:
            return None, f'pip install {OLD_TOOL} failed: {r.stderr.strip().splitlines()[-1:]}'
        (venv / '.complete').touch()
    return py, None


def make_case(folder: Path, shape, spacing, seed=5) -> Path:
    from nnunetv2_cam_core.demo import write_sample_case
    return write_sample_case(folder, seed=seed, shape=shape, spacing=spacing, name='bench')


def ours_cmd(model, case, out, folds, tta, layer, method, classes, device):
    cmd = [BIN / 'python', '-m', 'nnunetv2_cam_core', '-i', case, '-o', out, '-m', model, '-f', *folds,
           '--target-layer', layer, '--method', method, '--target-class', *classes, '-device', device,
           '--progress', 'none', '--overwrite']
    return cmd + ([] if tta else ['--disable_tta'])


def predict_cmd(model, case_dir, out, folds, tta, device):
    cmd = [BIN / 'nnUNetv2_predict_from_modelfolder', '-i', case_dir, '-o', out, '-m', model, '-f', *folds,
           '-device', device]
    return cmd + ([] if tta else ['--disable_tta'])


def old_cmd(py, model, case_dir, out, folds, tta, layer, method, cls, device):
    cmd = [py, '-c', 'from nnunetv2_cam.cli import main; main()', '-i', case_dir, '-o', out, '-m', model,
           '-f', *folds, '--target-layer', layer, '--target-class', cls, '--method', method, '--cam-type', '3d',
           '-device', device, '--no-save-slices']
    return cmd + (['--disable-tta'] if not tta else [])


def bench_model(name, model, case, device, rows, work, old_py, old_why, quick, on_row=None):
    """The comparison for one model and case; rows vary layer, method, TTA, folds and classes. on_row(): after
    each row (a report so far, should a later row not finish)."""
    import torch
    from nnunetv2_cam_core.layers import bottleneck, decoder_stages
    from nnunetv2_cam_core.model import load_predictor
    pred = load_predictor(Path(model), [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    layers = {'bottleneck': bottleneck(pred.network), 'last decoder': decoder_stages(pred.network)[-1]}
    labels = [k for k, v in pred.dataset_json['labels'].items() if v != 0]
    folds_avail = sorted(p.name[5:] for p in Path(model).glob('fold_*') if (p / 'checkpoint_final.pth').exists())
    settings = [dict(layer='bottleneck', method='gradcam', tta=False, folds=['0'], classes=labels[:1])]
    if not quick:
        settings += [dict(layer='last decoder', method='gradcam', tta=False, folds=['0'], classes=labels[:1]),
                     dict(layer='bottleneck', method='gradcam++', tta=False, folds=['0'], classes=labels[:1]),
                     dict(layer='bottleneck', method='gradcam', tta=False, folds=['0'], classes=labels),
                     dict(layer='bottleneck', method='gradcam', tta=True, folds=['0'], classes=labels[:1])]
        if len(folds_avail) > 1:
            settings.append(dict(layer='bottleneck', method='gradcam', tta=False, folds=folds_avail[:2],
                                 classes=labels[:1]))
    baseline = {}
    for s in settings:
        key = (s['tta'], tuple(s['folds']))
        if key not in baseline:
            baseline[key] = timed(predict_cmd(model, case.parent, work / 'pred', s['folds'], s['tta'], device))
            baseline[key]['tool'] = 'nnUNetv2_predict'
        base = baseline[key]
        out = work / 'ours'
        r = timed(ours_cmd(model, case, out, s['folds'], s['tta'], layers[s['layer']], s['method'], s['classes'],
                           device))
        r['tool'] = 'NNUNetCAM (seg + CAM)'
        if r['rc'] == 0:
            side = json.loads((out / 'bench_cam.json').read_text())
            r['tiles'] = side['tiles']
            r['tiles_per_s'] = round(side['tiles'] / r['wall_s'], 2)
        row = {'model': name, 'device': device, **{k: v for k, v in s.items()}, 'predict': base, 'ours': r,
               'ratio_vs_predict': round(r['wall_s'] / base['wall_s'], 3) if r['rc'] == base['rc'] == 0 else None,
               'rss_ratio_vs_predict':
                   round(r['peak_rss_mb'] / base['peak_rss_mb'], 3) if r['rc'] == base['rc'] == 0 else None}
        comparable = s['method'] in ('gradcam', 'gradcam++') and len(s['classes']) == 1 and len(s['folds']) == 1
        if old_py is not None and comparable and not s['tta']:  # its TTA runs 8 extra mask forwards per tile
            o = timed(old_cmd(old_py, model, case.parent, work / 'old', s['folds'], s['tta'], layers[s['layer']],
                              s['method'], '1', device))
            o['tool'] = OLD_TOOL
            row['old_tool'] = o
            if o['rc'] == 0 and r['rc'] == 0:
                row['speedup_vs_old_tool'] = round(o['wall_s'] / r['wall_s'], 2)
        elif old_py is None:
            row['old_tool'] = {'error': old_why}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ('model', 'layer', 'method', 'tta', 'folds', 'classes',
                                               'ratio_vs_predict')}), flush=True)
        if on_row:
            on_row()


def scaling(model, device, work, quick) -> list:
    """Whole-process time of segmentation + CAM against the number of tiles (case size)."""
    from nnunetv2_cam_core.demo import SPACING
    points = []
    sizes = [(20, 48, 48), (20, 64, 64)] if quick else [(20, 48, 48), (28, 96, 96), (40, 144, 144)]
    for shape in sizes:
        case = make_case(work / f'scale_{shape[1]}', shape, SPACING)
        out = work / f'scale_out_{shape[1]}'
        r = timed(ours_cmd(model, case, out, ['0'], False, 'bottleneck', 'gradcam', ['1'], device))
        if r['rc'] == 0:
            points.append({'tiles': json.loads((out / 'bench_cam.json').read_text())['tiles'], 'wall_s': r['wall_s']})
    return points


def cell(run: dict) -> str:
    gpu = f', {run["peak_gpu_mb"]}' if 'peak_gpu_mb' in run else ''
    return f'{run["wall_s"]} ({run["peak_rss_mb"]}{gpu})'


def write_report(rows, points, out: Path, machine: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps({'machine': machine, 'rows': rows, 'scaling': points}, indent=2))
    lines = [f'Machine: {machine}', '',
             '| model | layer | method | TTA | folds | classes | nnUNetv2_predict s (RSS MB[, GPU MB]) | NNUNetCAM s '
             '(RSS MB[, GPU MB]) | ratio | tiles/s | nnunetv2-cam 0.1.6.1 s (RSS MB[, GPU MB]) | speed-up vs it |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        p, o, old = r['predict'], r['ours'], r.get('old_tool', {})
        old_cell = cell(old) if old.get('rc') == 0 else (f'failed: {old["error"]}' if old.get('error') else '-')
        ours_cell = cell(o) if o['rc'] == 0 else f'failed: {o["error"]}'
        predict_cell = cell(p) if p['rc'] == 0 else f'failed: {p["error"]}'
        lines.append(f'| {r["model"]} | {r["layer"]} | {r["method"]} | {"on" if r["tta"] else "off"} | '
                     f'{" ".join(r["folds"])} | {len(r["classes"])} | {predict_cell} | '
                     f'{ours_cell} | {r["ratio_vs_predict"]} | {o.get("tiles_per_s", "-")} | {old_cell} | '
                     f'{r.get("speedup_vs_old_tool", "-")} |')
    lines += ['', 'Whole processes, timed with GNU time; RSS is the largest single process. Ratio: NNUNetCAM wall '
              'time / nnUNetv2_predict wall time, same model, case, device, folds and TTA.']
    (out / 'report.md').write_text('\n'.join(lines) + '\n')
    if points:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([p['tiles'] for p in points], [p['wall_s'] for p in points], 'o-')
        ax.set_xlabel('tiles')
        ax.set_ylabel('whole process, s')
        ax.set_title('segmentation + gradcam, 1 fold, TTA off', fontsize=8)
        fig.tight_layout()
        fig.savefig(out / 'scaling.png', dpi=100)


def machine_name(device: str) -> str:
    import torch
    if device.startswith('cuda'):
        return f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}'
    return f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, default=Path('benchmarks/results/cpu'))
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--quick', action='store_true', help='small case, main rows only')
    ap.add_argument('--no-old-tool', action='store_true', help='skip nnunetv2-cam 0.1.6.1')
    args = ap.parse_args(argv)
    from nnunetv2_cam_core.demo import SPACING, build_tiny_models, default_cache, model_folder
    results = build_tiny_models(default_cache())
    old_py, why = (None, 'skipped (--no-old-tool)') if args.no_old_tool else old_tool_python(default_cache().parent)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 75 tiles for the 3D model (patch 20x48x48, step 0.5: 3 x 5 x 5); the 2D model runs slice by slice
        shape3d = (20, 64, 64) if args.quick else (40, 144, 144)
        case3d = make_case(work / 'case3d', shape3d, SPACING)
        bench_model('tiny 3d_fullres', model_folder(results, '3d_fullres'), case3d, args.device, rows,
                    work / 'r3d', old_py, why, args.quick)
        if not args.quick:
            case2d = make_case(work / 'case2d', (16, 100, 100), SPACING, seed=6)
            bench_model('tiny 2d', model_folder(results, '2d'), case2d, args.device, rows, work / 'r2d', old_py,
                        why, quick=True)
        points = scaling(model_folder(results, '3d_fullres'), args.device, work / 'scale', args.quick)
    write_report(rows, points, args.out, machine_name(args.device))
    print((args.out / 'report.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
