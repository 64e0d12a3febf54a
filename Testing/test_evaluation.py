"""Trust figures (--evaluate): deletion/insertion through nnU-Net's sliding window on the region's tiles, the
sanity checks, the map against the masks, the folds' spread. Asserted are properties every build of the tiny models
has (the synthetic objects are known); the figures themselves go to the benchmarks."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from nnunetv2_cam_core.api import CamEngine
from nnunetv2_cam_core.cli import main
from nnunetv2_cam_core.evaluation import CaseEvaluation, EvaluationSettings, fold_spread, mask_statistics
from nnunetv2_cam_core.methods import principal_projection
from nnunetv2_cam_core.model import load_predictor

from conftest import geometry, read


@pytest.fixture(scope='module')
def evaluated(model3d, small_case, tmp_path_factory):
    """One CLI run with every trust figure on a small case: two folds, gradcam at the last decoder stage."""
    out = tmp_path_factory.mktemp('evaluated')
    reference = small_case.parent / 'labels' / 'small.nii.gz'
    rc = main([str(a) for a in ['-i', small_case, '-o', out, '-m', model3d, '-f', '0', '1', '--disable_tta',
                                '-device', 'cpu', '--target-class', 'lesion', 'organ', '--target-layer',
                                'last_decoder', '--evaluate', '--eval-steps', '5', '--eval-seeds', '2',
                                '--reference-mask', reference, '--save-fold-spread', '--progress', 'json']])
    assert rc == 0
    return out, json.loads((out / 'small_cam.json').read_text())


def test_the_maps_ranking_deletes_faster_than_random(evaluated):
    _, sidecar = evaluated
    for name in ('lesion', 'organ'):
        e = sidecar['classes'][name]['evaluation']
        assert len(e['deletion']) == len(e['insertion']) == len(e['fractions']) == 6
        # the curves meet at their ends: the original case and the region all baseline
        assert e['deletion'][0] == e['insertion'][-1] and e['deletion'][-1] == e['insertion'][0]
        assert e['deletion'][0] > e['deletion'][-1]
        assert e['deletion_auc'] < e['random_deletion_auc'], name
        assert e['deletion_ratio'] == pytest.approx(e['deletion_auc'] / e['random_deletion_auc'])
        # a random ranking inserted is the reversed ranking deleted: the same images, read backwards
        assert e['random_insertion'] == pytest.approx(e['random_deletion'][::-1])
        assert e['random_insertion_auc'] == pytest.approx(e['random_deletion_auc'])
        assert e['region_tiles'] >= 1 and e['region_voxels'] > sidecar['classes'][name]['predicted_voxels']


def test_randomisation_steps_and_verdict(evaluated):
    """Adebayo et al.'s cascading randomisation, head first; the verdict follows the correlation once the whole
    decoder is random."""
    _, sidecar = evaluated
    for name in ('lesion', 'organ'):
        s = sidecar['classes'][name]['evaluation']['sanity']
        steps = s['model_randomisation']
        assert [st['randomised'] for st in steps] == [f'up to decoder stage {k}' for k in (2, 1, 0)] + \
            [f'up to encoder stage {k}' for k in (3, 2, 1, 0)]
        assert s['spearman_after_decoder'] == steps[2]['spearman']
        r = s['spearman_after_decoder']
        assert s['passes'] == (r is None or r <= 0.5)
        assert s['verdict'].startswith('passes' if s['passes'] else 'FAILS')
        assert s['data_randomisation_spearman'] is None or -1 <= s['data_randomisation_spearman'] <= 1


def test_the_sanity_check_flags_an_element_wise_map_that_follows_the_image(model3d, small_case, evaluated):
    """HiResCAM at the last decoder stage is gradient x activation at full resolution: with the decoder random it
    still follows the image's edges (rank correlation about 0.7-0.99 on every build tried), which is what the
    check exists to catch; Grad-CAM's map at the same layer changes much more (about -0.1-0.5)."""
    _, sidecar = evaluated
    pred = load_predictor(model3d, [0, 1], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, 'last_decoder', ['lesion', 'organ'], 'hirescam')
    data, props, _, _ = engine.preprocess([str(small_case)])
    res = engine.run(data, props, keep_preprocessed=True)
    ev = CaseEvaluation(engine, data, res.logits, res.maps, EvaluationSettings(steps=1, seeds=1))
    plan = ev.plan()
    for t in engine.targets:
        s = ev.sanity(t, plan[t.name]['mask'], plan[t.name]['region'])
        assert not s['passes'] and s['verdict'].startswith('FAILS'), (t.name, s['spearman_after_decoder'])
        gradcam = sidecar['classes'][t.name]['evaluation']['sanity']['spearman_after_decoder']
        assert gradcam is None or gradcam < s['spearman_after_decoder']


def test_map_against_predicted_and_reference_masks(evaluated):
    _, sidecar = evaluated
    for name in ('lesion', 'organ'):
        stats = sidecar['classes'][name]['evaluation']['mask_statistics']
        for which in ('predicted', 'reference'):
            st = stats[which]
            assert st['mask_voxels'] > 0 and 0 < st['energy_in_mask'] and st['energy_in_mask'] + \
                st['energy_in_ring'] <= 1 + 1e-9 and st['centroid_distance_mm'] >= 0
        assert stats['predicted']['energy_in_mask'] == pytest.approx(
            sidecar['classes'][name]['energy_in_predicted_mask'])


def test_curves_png_fold_spread_and_settings(evaluated, small_case):
    out, sidecar = evaluated
    settings = sidecar['evaluation_settings']
    assert settings['steps'] == 5 and settings['seeds'] == 2 and settings['baseline'] == 'blur'
    assert Image.open(out / settings['curves']).size[0] > 100
    image = read(small_case)
    for name, file in sidecar['fold_spread'].items():
        spread = read(out / file)
        assert geometry(spread) == geometry(image)
        arr = sitk.GetArrayFromImage(spread)
        assert arr.min() >= 0 and arr.max() <= 0.5 + 1e-6  # the std of values in [0, 1]
    assert sidecar['timings_s']['evaluate'] > 0 and sidecar['timings_s']['fold_spread'] > 0


def test_evaluation_is_its_own_stage_in_the_progress(model3d, small_case, tmp_path, capsys):
    rc = main([str(a) for a in ['-i', small_case, '-o', tmp_path, '-m', model3d, '-f', '0', '--disable_tta',
                                '--evaluate', '--eval-steps', '1', '--eval-seeds', '1', '--eval-no-sanity',
                                '--progress', 'json']])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stages = [e['stage'] for e in events if e['event'] == 'stage']
    assert stages.index('tiles') < stages.index('evaluate') < stages.index('export')
    steps = [e for e in events if e['event'] == 'steps']
    assert steps and all(e['stage'] == 'evaluate' for e in steps) and steps[-1]['step'] == steps[-1]['steps']


@pytest.fixture(scope='module')
def small(model3d, small_case):
    pred = load_predictor(model3d, [0, 0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, target_class=['lesion', 'organ'], target_layer='last_decoder')
    data, props, _, _ = engine.preprocess([str(small_case)])
    return engine, data, props


def test_an_absent_class_is_skipped_with_a_message_and_zero_statistics(small):
    engine, data, props = small
    res = engine.run(data, props, keep_preprocessed=True)
    logits = res.logits.clone()
    logits[engine.targets[0].channel] = -1e4  # nothing predicted as lesion
    ev = CaseEvaluation(engine, data, logits, res.maps, EvaluationSettings(steps=1, seeds=1, sanity=False))
    out = ev.run()
    assert out['lesion'] == {'skipped': 'no voxels predicted as lesion: nothing to evaluate'}
    assert 'deletion_auc' in out['organ']
    zeros = mask_statistics(res.cams['lesion'], np.zeros(res.segmentation.shape, bool), props['spacing'], 5.0)
    assert zeros == {'energy_in_mask': 0.0, 'energy_in_ring': 0.0, 'pointing_game': False,
                     'centroid_distance_mm': 0.0, 'mask_voxels': 0}


def test_fold_spread_is_zero_where_folds_agree(small, small_case):
    engine, data, props = small  # the same fold twice
    spread = fold_spread(engine, data, props)
    assert spread.shape == (2, *sitk.GetArrayFromImage(read(small_case)).shape)
    assert not spread.any()


def test_a_region_too_large_for_the_tile_bound_is_skipped(small):
    engine, data, props = small
    res = engine.run(data, props, keep_preprocessed=True)
    settings = EvaluationSettings(steps=1, seeds=1, sanity=False)
    settings.max_tiles = 1
    tiles = CaseEvaluation(engine, data, res.logits, res.maps, settings).plan()
    assert all('skipped' not in p for p in tiles.values())  # the small case is one tile
    settings.max_tiles, settings.margin_mm = 0, 0  # check() refuses 0; the plan itself applies any bound
    plan = CaseEvaluation(engine, data, res.logits, res.maps, settings).plan()
    assert all('--eval-max-tiles 0' in p['skipped'] for p in plan.values())


def test_a_flipped_principal_component_gives_the_same_map(monkeypatch):
    """The eigen methods' component has an arbitrary sign; the map must not depend on it."""
    X = torch.randn(3, 8, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    X[:, 0] += 4 * torch.linspace(0, 1, 7)  # a dominant direction
    volume, per_tile = principal_projection(X, (0, 2, 3, 4)), principal_projection(X, (2, 3, 4))
    eigh = torch.linalg.eigh

    def flipped(a):
        r = eigh(a)
        return type(r)((r.eigenvalues, -r.eigenvectors))
    monkeypatch.setattr(torch.linalg, 'eigh', flipped)
    assert torch.equal(principal_projection(X, (0, 2, 3, 4)), volume)
    assert torch.equal(principal_projection(X, (2, 3, 4)), per_tile)


def test_evaluate_an_earlier_runs_outputs(model3d, small_case, tmp_path, capsys):
    """`nnunetv2_cam evaluate -o FOLDER`: the same maps again, from the sidecar's settings, plus the figures."""
    out = tmp_path / 'out'
    assert main([str(a) for a in ['-i', small_case, '-o', out, '-m', model3d, '-f', '0', '--disable_tta',
                                  '--target-class', 'organ', '--target-layer', 'last_decoder', '-device', 'cpu',
                                  '--progress', 'none']]) == 0
    before = json.loads((out / 'small_cam.json').read_text())
    cam = sitk.GetArrayFromImage(read(out / before['cams']['organ']))
    assert main(['evaluate', '-o', str(out), '--eval-steps', '1', '--eval-seeds', '1', '--eval-no-sanity',
                 '-device', 'cpu', '--progress', 'none']) == 0
    after = json.loads((out / 'small_cam.json').read_text())
    assert 'deletion_auc' in after['classes']['organ']['evaluation']
    assert (after['layers'], after['folds'], after['tta']) == (before['layers'], before['folds'], False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read(out / after['cams']['organ'])), cam)
    assert main(['evaluate', '-o', str(tmp_path / 'empty')]) == 2
    assert 'no CASE_cam.json' in capsys.readouterr().err.splitlines()[-1]
