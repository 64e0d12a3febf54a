"""Cohorts: nnU-Net's -num_parts/-part_id split, parts running at once into one folder, a failing case that does not
stop the batch, plain-line progress in logs, and the cohort report (real runs of the tiny 3D model)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_outputs, cam_args, run_cli, write_cohort as cohort
from nnunetv2_cam_core.errors import UsageError
from nnunetv2_cam_core.inputs import select_part


def test_parts_are_disjoint_cover_every_case_and_keep_their_order():
    cases = {f'c{i:02d}': [f'c{i:02d}_0000.nii.gz'] for i in (5, 1, 9, 3, 7, 2, 8)}
    for n in (1, 2, 3, 7, 10):
        parts = [select_part(cases, n, i) for i in range(n)]
        ids = [c for p in parts for c in p]
        assert sorted(ids) == sorted(cases) and len(ids) == len(set(ids))
        assert all(list(p) == sorted(p) for p in parts)
        assert parts == [select_part(dict(reversed(list(cases.items()))), n, i) for i in range(n)]
    grown = {**cases, 'c04': ['c04_0000.nii.gz']}
    for i in range(3):
        kept = [c for c in select_part(grown, 3, i) if c in cases]
        assert kept == sorted(kept)
    for n, i in ((2, 2), (2, -1), (0, 0)):
        with pytest.raises(UsageError, match='part_id'):
            select_part(cases, n, i)


def test_parts_of_a_mixed_folder_are_nnunets_parts(tmp_path):
    """A folder that also holds endings the model's dataset does not name (.nrrd, .mha, upper case) is listed as
    nnU-Net lists it for that model, so every part holds nnU-Net's cases for that part."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    from nnunetv2_cam_core.inputs import find_cases
    names = ['c01_0000.nii.gz', 'c02_0000.nrrd', 'c03_0000.nii.gz', 'c04_0000.NII.GZ', 'c05_0000.mha',
             'c06_0000.nii.gz', 'c07_0000.nii.gz', 'c08_0000.nrrd', 'c09_0000.nii.gz']
    for n in names:
        (tmp_path / n).write_bytes(b'')
    theirs = create_lists_from_splitted_dataset_folder(str(tmp_path), '.nii.gz')
    ours = find_cases([str(tmp_path)], SimpleITKIO.supported_file_endings, {'0': 'CT'}, file_ending='.nii.gz')
    for n in (1, 2, 3):
        for i in range(n):
            assert [[Path(f).name for f in files] for files in select_part(ours, n, i).values()] == \
                [[Path(f).name for f in files] for files in theirs[i::n]]
    # a folder holding none of the dataset's ending: every ending the reader takes
    other = tmp_path / 'nrrd'
    other.mkdir()
    (other / 'c02_0000.nrrd').write_bytes(b'')
    assert list(find_cases([str(other)], SimpleITKIO.supported_file_endings, {'0': 'CT'}, file_ending='.nii.gz')) \
        == ['c02']


def test_a_wrong_part_is_one_line_before_the_model_loads(tmp_path, capsys):
    assert run_cli(['-i', tmp_path, '-o', tmp_path / 'out', '-m', tmp_path / 'no-model', '-num_parts', '2',
                    '-part_id', '2']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '0 <= part_id < num_parts' in err[0]


def test_two_parts_at_once_write_the_same_files_as_one_run(model3d, tmp_path):
    inputs = cohort(tmp_path / 'in', range(1, 5))
    assert run_cli(cam_args(model3d, inputs, tmp_path / 'one', '--progress', 'none')) == 0
    logs = [tmp_path / f'part{i}.log' for i in range(2)]
    with open(logs[0], 'w') as e0, open(logs[1], 'w') as e1:
        procs = [subprocess.Popen([sys.executable, '-m', 'nnunetv2_cam_core',
                                   *cam_args(model3d, inputs, tmp_path / 'two', '-num_parts', '2', '-part_id', str(i))],
                                  stdout=subprocess.DEVNULL, stderr=err) for i, err in enumerate((e0, e1))]
        assert [p.wait(600) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert_same_outputs(tmp_path / 'one', tmp_path / 'two', 4)
    # each part took its own two cases, and its log (stderr is a file) is plain lines
    for i, log in enumerate(logs):
        text = log.read_text()
        assert '\r' not in text
        mine = [f'case{s:03d}' for s in sorted(range(1, 5))[i::2]]
        assert all(f'{c}: tiles' in text for c in mine), text[-2000:]
        assert not any(f'{c}: tiles' in text for c in [f'case{s:03d}' for s in range(1, 5)] if c not in mine)


def test_a_corrupt_case_is_reported_and_the_others_are_written(model3d, tmp_path, capsys):
    inputs = cohort(tmp_path / 'in', (1, 3))
    (inputs / 'case002_0000.nii.gz').write_bytes(b'not an image')
    out = tmp_path / 'out'
    assert run_cli(cam_args(model3d, inputs, out, '--progress', 'json')) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    failed = [e for e in events if e['event'] == 'failed']
    assert len(failed) == 1 and failed[0]['case'] == 'case002'
    assert events[-1]['event'] == 'error' and 'see ' in events[-1]['message'] and '1 of 3' in events[-1]['message']
    failures = json.loads((out / 'failures.json').read_text())
    assert list(failures) == ['case002'] and failures['case002']['error']
    assert failures['case002']['inputs'] == [str(inputs / 'case002_0000.nii.gz')]
    assert (out / 'case001_cam.json').is_file() and (out / 'case003_cam.json').is_file()
    assert not [p for p in out.iterdir() if p.name.startswith('case002') or p.name.startswith('.nnunetcam')]
    # --stop-on-error: today's behaviour, the batch stops at the bad case
    assert run_cli(cam_args(model3d, inputs, tmp_path / 'stop', '--progress', 'none', '--stop-on-error')) == 2
    assert (tmp_path / 'stop' / 'case001_cam.json').is_file()
    assert not (tmp_path / 'stop' / 'case003_cam.json').exists()
    # repaired and run again: only that case runs, and failures.json goes
    shutil.rmtree(inputs)
    cohort(inputs, (1, 2, 3))
    before = (out / 'case001_cam.json').stat().st_mtime_ns
    assert run_cli(cam_args(model3d, inputs, out, '--progress', 'none')) == 0
    assert (out / 'case002_cam.json').is_file() and not (out / 'failures.json').exists()
    assert (out / 'case001_cam.json').stat().st_mtime_ns == before


def test_rank_test_and_effect_size_on_known_samples():
    from nnunetv2_cam_core.cohort_statistics import rank_test as _rank_test
    higher = _rank_test([5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 4.5, 4.8])
    assert higher['effect_size'] == 1.0 and higher['p'] == pytest.approx(2 / 924)  # complete separation, 6 vs 6
    assert _rank_test([1, 2, 3, 4, 4.5, 4.8], [5, 6, 7, 8, 9, 10])['effect_size'] == -1.0
    assert _rank_test([0.0] * 6, [0.0] * 6) == {'u': 18.0, 'p': 1.0, 'effect_size': 0.0}
    mixed = _rank_test([1, 3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12])
    assert mixed['p'] > 0.5 and abs(mixed['effect_size']) < 0.2


def test_a_part_holding_one_case_of_a_batch_reports_its_failure(model3d, tmp_path):
    inputs = cohort(tmp_path / 'in', (1,))
    (inputs / 'case002_0000.nii.gz').write_bytes(b'not an image')
    out = tmp_path / 'out'
    assert run_cli(cam_args(model3d, inputs, out, '--progress', 'none', '-num_parts', '2', '-part_id', '1')) == 1
    assert list(json.loads((out / 'failures.json').read_text())) == ['case002']
    assert run_cli(cam_args(model3d, inputs, out, '--progress', 'none', '-num_parts', '2', '-part_id', '0')) == 0
    assert (out / 'case001_cam.json').is_file()


@pytest.fixture(scope='module')
def cohorts(model3d, tmp_path_factory):
    """Six cases as trained, and the same six with the objects dimmed to a tenth of their contrast."""
    root = tmp_path_factory.mktemp('cohorts')
    out = {}
    for name, contrast in (('trained', 1.0), ('dimmed', 0.1)):
        inputs = cohort(root / f'in_{name}', range(11, 17), contrast)
        assert run_cli(cam_args(model3d, inputs, root / name, '--progress', 'none')) == 0
        out[name] = root / name
    return out


def test_report_shows_the_shift_of_a_dimmed_cohort(cohorts, tmp_path):
    from nnunetv2_cam_core import compare_cohorts
    from nnunetv2_cam_core.report import main as report
    result = compare_cohorts(cohorts['trained'], cohorts['dimmed'])
    assert len(result['records']) == 12 and {r['class'] for r in result['records']} == {'lesion'}
    volume = next(t for t in result['tests'] if t['figure'] == 'predicted_volume_ml')
    assert volume['p'] < 0.05 and volume['effect_size'] > 0  # the trained cohort has more predicted lesion
    assert report([str(cohorts['trained']), str(cohorts['dimmed']), '-o', str(tmp_path / 'r')]) == 0
    for name in ('cases.csv', 'summary.md', 'distributions.png', 'overview.png'):
        assert (tmp_path / 'r' / name).stat().st_size > 0
    rows = (tmp_path / 'r' / 'cases.csv').read_text().splitlines()
    assert len(rows) == 13 and 'predicted_volume_ml' in rows[0] and 'method' in rows[0]
    summary = (tmp_path / 'r' / 'summary.md').read_text()
    assert next(line for line in summary.splitlines() if line.startswith('| predicted_volume_ml')).endswith('yes |')


def test_identical_cohorts_show_no_shift(cohorts, tmp_path):
    from nnunetv2_cam_core import compare_cohorts
    copy = shutil.copytree(cohorts['trained'], tmp_path / 'trained')
    result = compare_cohorts(cohorts['trained'], copy)
    assert result['tests'] and all(t['p'] == 1.0 and t['effect_size'] == 0 for t in result['tests'])
    assert result['paired']  # the same cases: pairs
    assert {t['figure']: t['test'] for t in result['tests']}['energy_in_mask'] == 'Wilcoxon signed-rank'
    one = compare_cohorts(cohorts['trained'])
    assert one['tests'] == [] and {s['figure'] for s in one['summaries']} >= {'predicted_volume_ml', 'energy_in_mask'}


def _renamed(folder, out, prefix='x'):
    """A copy whose cases have other ids (an independent cohort of the same images)."""
    copy = shutil.copytree(folder, out)
    for p in copy.glob('*_cam.json'):
        d = json.loads(p.read_text())
        d['case'] = prefix + d['case']
        p.write_text(json.dumps(d))
    return copy


def test_pointing_game_is_a_hit_rate_compared_by_fishers_or_mcnemars_test(cohorts, tmp_path):
    """A hit or a miss per case: the hit rate with its exact 95 % interval, Fisher's exact test between
    independent cohorts and the exact McNemar test between paired ones; numbers: Mann-Whitney U or Wilcoxon."""
    from scipy import stats
    from nnunetv2_cam_core import compare_cohorts
    from nnunetv2_cam_core.report import main as report
    # the dimmed cohort may predict no lesion at all (no pointing game): the trained one against copies of itself
    other = _renamed(cohorts['trained'], tmp_path / 'other')
    same = shutil.copytree(cohorts['trained'], tmp_path / 'same')
    for b, paired, tests in ((other, False, ('Fisher exact', 'Mann-Whitney U')),
                             (same, True, ('exact McNemar', 'Wilcoxon signed-rank'))):
        result = compare_cohorts(cohorts['trained'], b)
        assert result['paired'] is paired
        hits = {}
        for s in (s for s in result['summaries'] if s['figure'] == 'pointing_game' and s['n']):
            rows = [r['pointing_game'] for r in result['records'] if r['cohort'] == s['cohort']
                    and r['pointing_game'] is not None]
            ci = stats.binomtest(sum(rows), len(rows)).proportion_ci(method='exact')
            assert (s['hits'], s['n'], s['rate']) == (sum(rows), len(rows), sum(rows) / len(rows))
            assert (s['ci_low'], s['ci_high']) == pytest.approx((ci.low, ci.high))
            assert 'median' not in s
            hits[s['cohort']] = rows
        t = {t['figure']: t for t in result['tests']}
        assert (t['pointing_game']['test'], t['energy_in_mask']['test']) == tests
        if not paired:
            (_, a), (_, b) = hits.items()
            table = [[sum(a), len(a) - sum(a)], [sum(b), len(b) - sum(b)]]
            assert t['pointing_game']['p'] == pytest.approx(stats.fisher_exact(table).pvalue)
            assert t['pointing_game']['effect_size'] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert report([str(cohorts['trained']), str(other), '-o', str(tmp_path / 'r')]) == 0
    summary = (tmp_path / 'r' / 'summary.md').read_text()
    line = next(line for line in summary.splitlines() if line.startswith('| pointing_game'))
    assert '% hit (' in line and '95% CI' in line and 'Fisher exact' in line


def test_paired_ranks_on_known_samples():
    from nnunetv2_cam_core.cohort_statistics import hit_test, signed_rank_test
    up = signed_rank_test([2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1])
    assert up['effect_size'] == 1.0 and up['p'] == pytest.approx(2 / 64)  # every pair up: 2 of the 2^6 signs
    assert signed_rank_test([1, 2, 3], [1, 2, 3]) == {'p': 1.0, 'effect_size': 0.0}
    mixed = signed_rank_test([1, 5, 2, 8, 3, 9], [2, 4, 3, 7, 4, 8])
    assert mixed['p'] > 0.5 and abs(mixed['effect_size']) < 0.5
    # 5 pairs where only A hits, none where only B does: McNemar's binomial p = 2 / 2^5
    assert hit_test([1] * 8, [0] * 5 + [1] * 3, paired=True) == {'p': pytest.approx(2 / 32), 'effect_size': 5 / 8}
    assert hit_test([1] * 6, [0] * 6, paired=False)['p'] == pytest.approx(2 / 924)  # Fisher, 6 of 12 all in A


def test_a_map_zero_everywhere_is_left_out_of_the_figures_and_says_so(cohorts, tmp_path):
    """A class predicted, but with a map of zeros: no centroid distance (not 0 mm), no pointing game, no energy
    share; the case is left out of those figures' statistics and the summary says why."""
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2_cam_core import compare_cohorts
    from nnunetv2_cam_core.report import main as report
    before = next(s for s in compare_cohorts(cohorts['trained'])['summaries'] if s['figure'] == 'centroid_distance_mm')
    copy = shutil.copytree(cohorts['trained'], tmp_path / 'zeroed')
    sc = next(d for d in (json.loads(p.read_text()) for p in sorted(copy.glob('*_cam.json')))
              if d['classes']['lesion']['predicted_voxels'])
    path = copy / sc['cams']['lesion']
    img = sitk.ReadImage(str(path))
    zero = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(img)))
    zero.CopyInformation(img)
    sitk.WriteImage(zero, str(path))
    result = compare_cohorts(copy)
    row = next(r for r in result['records'] if r['case'] == sc['case'])
    assert row['predicted_volume_ml'] > 0
    assert row['centroid_distance_mm'] is None and row['pointing_game'] is None and row['energy_in_mask'] is None
    s = next(s for s in result['summaries'] if s['figure'] == 'centroid_distance_mm')
    assert s['n'] == before['n'] - 1 and s['left_out'] == {**before['left_out'], 'the map is zero everywhere': 1}
    assert report([str(copy), '-o', str(tmp_path / 'r')]) == 0
    line = next(line for line in (tmp_path / 'r' / 'summary.md').read_text().splitlines()
                if line.startswith('| centroid_distance_mm'))
    assert f'(n {s["n"]}); left out: ' in line and '1 the map is zero everywhere' in line


@pytest.mark.parametrize('key, value', [('tta', True), ('step_size', 0.33), ('folds', [0, 1]),
                                        ('checkpoint', 'checkpoint_best.pth'), ('pooling', 'volume'),
                                        ('target_region', 'all')])
def test_report_refuses_every_map_changing_difference(cohorts, tmp_path, capsys, key, value):
    """Any setting that changes a map differs: refused in one line unless --force; forced, the summary shows both
    cohorts' settings."""
    from nnunetv2_cam_core.report import main as report
    other = shutil.copytree(cohorts['dimmed'], tmp_path / 'other')
    for p in other.glob('*_cam.json'):
        d = json.loads(p.read_text())
        d[key] = value
        p.write_text(json.dumps(d))
    assert report([str(cohorts['trained']), str(other), '-o', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{key} differs' in err[0] and '--force' in err[0]
    assert not (tmp_path / 'r').exists()
    assert report([str(cohorts['trained']), str(other), '-o', str(tmp_path / 'r'), '--force']) == 0
    lines = (tmp_path / 'r' / 'summary.md').read_text().splitlines()
    mine = [line for line in lines if line.startswith('Settings of ')]
    assert [line.split(' (')[0] for line in mine] == ['Settings of trained', 'Settings of other']
    assert f'{key} {json.loads(next(cohorts["trained"].glob("*_cam.json")).read_text())[key]}' in mine[0]
    assert f'{key} {value}' in mine[1]


def test_report_refuses_runs_with_other_settings(cohorts, tmp_path, capsys):
    from nnunetv2_cam_core.report import main as report
    other = shutil.copytree(cohorts['dimmed'], tmp_path / 'other')
    sidecar = next(other.glob('*_cam.json'))
    d = json.loads(sidecar.read_text())
    d['method'] = 'hirescam'
    sidecar.write_text(json.dumps(d))
    assert report([str(cohorts['trained']), str(other), '-o', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'method differs' in err[0] and '--force' in err[0]
    assert not (tmp_path / 'r').exists()
    assert report([str(cohorts['trained']), str(other), '-o', str(tmp_path / 'r'), '--force']) == 0
    assert report([str(tmp_path), '-o', str(tmp_path / 'r2')]) == 2
    assert 'no CASE_cam.json' in capsys.readouterr().err
