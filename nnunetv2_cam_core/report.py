"""`nnunetv2_cam report OUT_A [OUT_B] -o REPORT`: one row per case and class from the sidecars and files of one or
two output folders (cohorts), each figure per cohort (median and IQR, or a hit rate) and for two cohorts a test
between them (`cohort_statistics`); cases.csv, summary.md, distributions.png and overview.png."""
import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .cohort_statistics import BINARY, compare, summary
from .errors import CamError, UsageError
from .evaluation import mask_statistics
from .progress import Progress

FIGURES = ('predicted_volume_ml', 'energy_in_mask', 'energy_in_ring', 'pointing_game', 'centroid_distance_mm',
           'deletion_ratio', 'insertion_ratio', 'sanity_spearman')
# every setting that changes a map: cohorts compared must share them all (unless forced)
SETTINGS = ('model', 'configuration', 'folds', 'checkpoint', 'method', 'layers', 'classes', 'pooling', 'pool_size',
            'pool_mode', 'target_region', 'tta', 'step_size')
WHERE = ('energy_in_mask', 'energy_in_ring', 'pointing_game', 'centroid_distance_mm')


def _read(path: Path):
    """An array in file order (z, y, x) and its spacing in the same order."""
    if not path.is_file():
        raise UsageError(f'{path} is named by a sidecar in {path.parent} and is missing; rerun that case')
    if path.suffix == '.png' and path.with_suffix('.npy').is_file():  # PNG models: the exact map is the .npy
        a = np.load(path.with_suffix('.npy'))
        return a, (1.0,) * a.ndim
    if path.suffix in ('.tif', '.tiff'):
        import tifffile
        a = tifffile.imread(str(path))
        meta = path.with_suffix('.json')
        spacing = json.loads(meta.read_text())['spacing'] if meta.is_file() else (1.0,) * a.ndim
        return a, tuple(spacing)
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing())[::-1]


def _model_name(model: str) -> str:
    return '/'.join(Path(model).parts[-2:])


def _settings(sidecar: dict) -> dict:
    s = {k: sidecar.get(k) for k in SETTINGS}
    s['model'] = _model_name(s['model'] or '')
    s['classes'] = list(sidecar['classes'])
    return s


def _cases(folder: Path) -> List[dict]:
    sidecars = sorted(folder.glob('*_cam.json'))
    if not sidecars:
        raise UsageError(f'no CASE_cam.json in {folder}; give the output folder of an nnunetv2_cam run')
    return [json.loads(p.read_text()) for p in sidecars]


def _check(cohorts: Dict[str, List[dict]], force: bool) -> None:
    """Every map-changing setting the same across every case of every cohort, unless forced."""
    if force:
        return
    first_label, first = next(iter(cohorts.items()))
    ref = _settings(first[0])
    for label, sidecars in cohorts.items():
        for sc in sidecars:
            s = _settings(sc)
            for key in SETTINGS:
                if s[key] != ref[key]:
                    raise UsageError(f'{key} differs: {ref[key]} ({first_label}, {first[0]["case"]}) vs {s[key]} '
                                     f'({label}, {sc["case"]}); it changes the maps, so compare runs with the same '
                                     f'{key}, or pass --force')


def case_records(label: str, folder: Path, sidecar: dict, margin_mm: float) -> List[dict]:
    """One row per class of one case: predicted volume, where the map lies against the predicted mask, and the
    --evaluate figures when that ran; `undefined` says why a figure is missing."""
    seg, spacing = _read(folder / sidecar['segmentation'])
    voxel_ml = float(np.prod(spacing)) / 1000
    rows = []
    for name, st in sidecar['classes'].items():
        cam, _ = _read(folder / sidecar['cams'][name])
        cam = cam.reshape(seg.shape)
        mask = np.isin(seg, st['labels'])
        m = mask_statistics(cam, mask, spacing, margin_mm)
        where = {k: m[k] for k in WHERE}
        if where['pointing_game'] is not None:
            where['pointing_game'] = int(where['pointing_game'])
        undefined = {}
        if not mask.any():
            where = dict.fromkeys(where)  # where the map lies against a mask: undefined without one
            undefined.update(dict.fromkeys(WHERE, 'no predicted voxels'))
        elif m.get('undefined'):
            undefined.update({k: m['undefined'] for k in WHERE if where[k] is None})
        ev = st.get('evaluation') or {}
        sanity = ev.get('sanity') or {}
        for k in ('deletion_ratio', 'insertion_ratio'):
            if ev.get(k) is None:
                undefined[k] = 'cannot rank: the baseline does not lower the score' if ev.get('cannot_rank') else \
                    'not evaluated'
        if sanity.get('spearman_after_decoder') is None:
            undefined['sanity_spearman'] = 'flat map' if sanity else 'not evaluated'
        rows.append({'cohort': label, 'case': sidecar['case'], 'class': name,
                     'predicted_volume_ml': int(mask.sum()) * voxel_ml, **where,
                     'deletion_ratio': ev.get('deletion_ratio'), 'insertion_ratio': ev.get('insertion_ratio'),
                     'deletion_auc': ev.get('deletion_auc'), 'insertion_auc': ev.get('insertion_auc'),
                     'original_score': ev.get('original_score'), 'baseline_score': ev.get('baseline_score'),
                     'sanity_spearman': sanity.get('spearman_after_decoder'),
                     'undefined': json.dumps(undefined) if undefined else None,
                     **{k: json.dumps(v) if isinstance(v, (list, dict)) else v
                        for k, v in _settings(sidecar).items() if k != 'classes'}})
    return rows


def _left_out(records: List[dict], cohort: str, name: str, figure: str) -> Dict[str, int]:
    """Why a figure is missing, with the number of cases, in one cohort and class."""
    out: Dict[str, int] = {}
    for r in records:
        if r['cohort'] == cohort and r['class'] == name and r[figure] is None:
            why = json.loads(r['undefined'] or '{}').get(figure, 'undefined')
            out[why] = out.get(why, 0) + 1
    return out


def _by_case(records: List[dict], cohort: str, name: str, figure: str) -> Dict[str, float]:
    return {r['case']: r[figure] for r in records if r['cohort'] == cohort and r['class'] == name
            and r[figure] is not None}


def compare_cohorts(folder_a, folder_b=None, force: bool = False, margin_mm: float = 5.0,
                    progress: Optional[Progress] = None) -> dict:
    """One or two output folders -> {'records': one dict per case and class, 'summaries': per cohort, class and
    figure (n, median, q1, q3; or hits, rate and its 95 % interval) and the cases left out with why, 'tests': per
    class and figure for two cohorts (test, p, effect_size), 'paired': whether both hold the same case ids}."""
    folders = [Path(f) for f in (folder_a, folder_b) if f is not None]
    labels = [f.resolve().name or str(f) for f in folders]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f'A {labels[0]}', f'B {labels[1]}']
    cohorts = {label: _cases(f) for label, f in zip(labels, folders)}
    _check(cohorts, force)
    paired = len(labels) == 2 and {sc['case'] for sc in cohorts[labels[0]]} == {sc['case'] for sc in cohorts[labels[1]]}
    progress = progress or Progress('none')
    records = []
    for label, f in zip(labels, folders):
        progress.stage('read', label)
        for k, sc in enumerate(cohorts[label], 1):
            records += case_records(label, f, sc, margin_mm)
            progress.steps(k, len(cohorts[label]))
    classes = list(dict.fromkeys(r['class'] for r in records))
    figures = [f for f in FIGURES if any(r[f] is not None for r in records)]
    summaries, tests = [], []
    for name in classes:
        for fig in figures:
            per = {label: _by_case(records, label, name, fig) for label in labels}
            for label, values in per.items():
                left_out = _left_out(records, label, name, fig)
                if values or left_out:
                    summaries.append({'cohort': label, 'class': name, 'figure': fig, 'left_out': left_out,
                                      **(summary(list(values.values()), fig in BINARY) if values else {'n': 0})})
            t = compare(fig, *per.values(), paired) if len(labels) == 2 else None
            if t:
                tests.append({'class': name, 'figure': fig, **t})
    return {'cohorts': labels, 'folders': [str(f) for f in folders], 'classes': classes, 'figures': figures,
            'paired': paired, 'settings': {label: _distinct_settings(cohorts[label]) for label in labels},
            'records': records, 'summaries': summaries, 'tests': tests,
            'failed_cases': {label: sorted(json.loads((f / 'failures.json').read_text()))
                             for label, f in zip(labels, folders) if (f / 'failures.json').is_file()}}


def _distinct_settings(sidecars: List[dict]) -> List[dict]:
    """Each set of settings in a cohort, with its number of cases (one set unless forced)."""
    out: List[dict] = []
    for sc in sidecars:
        s = _settings(sc)
        same = next((o for o in out if o['settings'] == s), None)
        if same:
            same['cases'] += 1
        else:
            out.append({'settings': s, 'cases': 1})
    return out


def _write_csv(records: List[dict], path: Path) -> None:
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)


def _cell(s: Optional[dict]) -> str:
    if not s:
        return '-'
    if s['n'] == 0:
        text = 'none'
    elif 'rate' in s:
        text = f'{s["rate"]:.0%} hit ({s["hits"]}/{s["n"]}) [95% CI {s["ci_low"]:.0%}, {s["ci_high"]:.0%}]'
    else:
        text = f'{s["median"]:.3g} [{s["q1"]:.3g}, {s["q3"]:.3g}] (n {s["n"]})'
    if s['left_out']:
        text += '; left out: ' + ', '.join(f'{n} {why}' for why, n in s['left_out'].items())
    return text


def _write_summary(result: dict, path: Path) -> None:
    labels, lines = result['cohorts'], []
    lines += ['# Cohort report', '']
    lines += [f'- {label}: `{folder}`, {len({r["case"] for r in result["records"] if r["cohort"] == label})} cases'
              + (f', {len(result["failed_cases"][label])} failed (failures.json)' if label in result['failed_cases']
                 else '') for label, folder in zip(labels, result['folders'])]
    lines.append('')
    for label in labels:
        for group in result['settings'][label]:
            s = group['settings']
            lines.append(f'Settings of {label} ({group["cases"]} cases): ' +
                         ', '.join(f'{k} {s[k]}' for k in SETTINGS if s.get(k) is not None))
    lines.append('')
    two = len(labels) == 2
    lines += ['Per cohort, over the cases where a figure is defined: median [IQR] (n), or for the pointing game (is '
              'the map\'s maximum inside the predicted mask) the hit rate with its exact 95 % interval; "left out" '
              'counts the cases without the figure and says why (where the map lies against the mask needs a '
              'predicted mask and a map that is not zero everywhere; deletion ratios need a baseline that lowers the '
              'score).' + ((' The cohorts hold the same cases, so they are compared as pairs: Wilcoxon signed-rank '
                            '(effect size: matched-pairs rank-biserial correlation), exact McNemar for the pointing '
                            'game (effect size: difference of hit rates).' if result['paired'] else
                            ' Independent cohorts: two-sided Mann-Whitney U (effect size: rank-biserial correlation, '
                            '+1: every case of the first cohort higher, -1: lower), Fisher\'s exact test for the '
                            'pointing game (effect size: difference of hit rates).') +
                           ' Shift: p < 0.05, not corrected for the number of figures (about one in twenty crosses '
                           'it by chance).' if two else ''), '']
    summ = {(s['cohort'], s['class'], s['figure']): s for s in result['summaries']}
    tests = {(t['class'], t['figure']): t for t in result['tests']}
    for name in result['classes']:
        lines += [f'## {name}', '']
        head = ['figure', *labels] + (['test', 'p', 'effect size', 'shift'] if two else [])
        lines += ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
        for fig in result['figures']:
            cells = [fig] + [_cell(summ.get((label, name, fig))) for label in labels]
            t = tests.get((name, fig))
            if two:
                cells += [t['test'], f'{t["p"]:.3g}', f'{t["effect_size"]:+.2f}', 'yes' if t['p'] < 0.05 else 'no'] \
                    if t else ['-', '-', '-', '-']
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    path.write_text('\n'.join(lines))


def _plot_distributions(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    classes, figures, labels = result['classes'], result['figures'], result['cohorts']
    fig, axes = plt.subplots(len(classes), len(figures), figsize=(2.6 * len(figures), 2.8 * len(classes)),
                             squeeze=False)
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        for j, f in enumerate(figures):
            ax = axes[i][j]
            data = [list(_by_case(result['records'], label, name, f).values()) for label in labels]
            ax.boxplot([d or [np.nan] for d in data], widths=0.5, showfliers=False)
            for k, values in enumerate(data):
                ax.scatter(k + 1 + rng.uniform(-0.12, 0.12, len(values)), values, s=10, alpha=0.7)
            ax.set_xticks(range(1, len(labels) + 1), [label[:14] for label in labels], fontsize=7)
            ax.set_title(f'{name}: {f}', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overview(result: dict, path: Path, per_end: int) -> None:
    """For each cohort and class, the cases with the lowest and the highest CAM energy in the predicted mask."""
    from .export import overview_row, stack_rows, window
    rows = []
    for label, folder in zip(result['cohorts'], result['folders']):
        sidecars = {sc['case']: sc for sc in _cases(Path(folder))}
        for name in result['classes']:
            recs = sorted((r for r in result['records'] if r['cohort'] == label and r['class'] == name),
                          key=lambda r: -1 if r['energy_in_mask'] is None else r['energy_in_mask'])
            chosen = recs[:per_end] + [r for r in recs[len(recs) - per_end:] if r not in recs[:per_end]]
            for r in chosen:
                sc = sidecars[r['case']]
                seg, _ = _read(Path(folder) / sc['segmentation'])
                cam = _read(Path(folder) / sc['cams'][name])[0].reshape(seg.shape)
                image = _read(Path(sc['inputs'][0]))[0] if Path(sc['inputs'][0]).is_file() else np.zeros(seg.shape)
                if image.ndim == seg.ndim + 1:  # RGB
                    image = image.mean(-1)
                if seg.ndim == 2:
                    seg, cam, image = seg[None], cam[None], image[None]
                end = 'lowest' if r in recs[:per_end] else 'highest'
                energy = 'no predicted voxels' if r['energy_in_mask'] is None else \
                    f'energy in mask {r["energy_in_mask"]:.2f}'
                rows.append(overview_row(window(image.astype(np.float32)), seg, cam,
                                         f'{label} {r["case"]} {name}: {energy} ({end})'))
    stack_rows(rows, str(path))


def write_report(folders: Sequence, out: Path, force: bool = False, margin_mm: float = 5.0,
                 per_end: int = 2, progress: Optional[Progress] = None) -> dict:
    result = compare_cohorts(*folders, force=force, margin_mm=margin_mm, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(result['records'], out / 'cases.csv')
    _write_summary(result, out / 'summary.md')
    _plot_distributions(result, out / 'distributions.png')
    _overview(result, out / 'overview.png', per_end)
    (out / 'tests.json').write_text(json.dumps(
        {k: result[k] for k in ('cohorts', 'folders', 'paired', 'settings', 'summaries', 'tests')}, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='nnunetv2_cam report', description=__doc__.split('\n')[0])
    p.add_argument('folders', nargs='+', type=Path, help='one or two output folders of nnunetv2_cam runs (cohorts)')
    p.add_argument('-o', '--output', type=Path, required=True, help='report folder')
    p.add_argument('--force', action='store_true', help='compare runs whose map-changing settings differ (model, '
                   'folds, checkpoint, method, layers, classes, pooling, pool size and mode, region, TTA, step)')
    p.add_argument('--margin-mm', type=float, default=5.0, help='width of the ring around the mask (default: 5)')
    p.add_argument('--cases-per-end', type=int, default=2,
                   help='overview: this many cases with the lowest and the highest energy in the mask (default: 2)')
    args = p.parse_args(argv)
    try:
        if len(args.folders) > 2:
            raise UsageError(f'{len(args.folders)} folders given; a report takes one cohort or compares two')
        progress = Progress('bar')
        result = write_report(args.folders, args.output, args.force, args.margin_mm, args.cases_per_end, progress)
        progress.close()
    except CamError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
    shifted = [f'{t["class"]}: {t["figure"]}' for t in result['tests'] if t['p'] < 0.05]
    print(f'wrote {args.output}/summary.md, cases.csv, distributions.png, overview.png'
          + (f'; shifted (p < 0.05): {", ".join(shifted) or "none"}' if len(result['cohorts']) == 2 else ''))
    return 0
