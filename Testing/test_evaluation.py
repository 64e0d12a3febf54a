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
from nnunetv2_cam_core.sliding_window import RegionPrediction
from nnunetv2_cam_core.targets import predicted_mask

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
        assert e['can_rank'] and e['deletion_auc'] < e['random_deletion_auc'], name
        assert e['deletion_ratio'] == pytest.approx(e['deletion_auc'] / e['random_deletion_auc'])
        # a random ranking inserted is the reversed ranking deleted: the same images, read backwards
        assert e['random_insertion'] == pytest.approx(e['random_deletion'][::-1])
        assert e['random_insertion_auc'] == pytest.approx(e['random_deletion_auc'])
        assert e['region_tiles'] >= 1 and e['region_voxels'] > sidecar['classes'][name]['predicted_voxels']
        # the ends are the original case's and the all-baseline region's scores, reported as such
        assert (e['original_score'], e['baseline_score']) == (e['deletion'][0], e['deletion'][-1])
        assert e['can_rank'] == (e['original_score'] - e['baseline_score'] > 1e-6)
        if e['can_rank']:
            gap = e['original_score'] - e['baseline_score']
            assert e['deletion_auc_normalised'] == pytest.approx((e['deletion_auc'] - e['baseline_score']) / gap)
            assert e['insertion_auc_normalised'] == pytest.approx((e['insertion_auc'] - e['baseline_score']) / gap)


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
        assert s['passes'] == (None if r is None else r <= 0.5)
        assert s['verdict'].startswith({True: 'passes', False: 'FAILS', None: 'is UNDEFINED'}[s['passes']])
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
    no_mask = mask_statistics(res.cams['lesion'], np.zeros(res.segmentation.shape, bool), props['spacing'], 5.0)
    assert no_mask == {'energy_in_mask': 0.0, 'energy_in_ring': 0.0, 'pointing_game': False,
                       'centroid_distance_mm': None, 'mask_voxels': 0, 'undefined': 'the mask is empty: no centroid'}


def test_a_map_zero_everywhere_has_no_centroid_distance(small):
    """No map, no distance (nor energy share or maximum): None, not a perfect 0 mm."""
    engine, data, props = small
    res = engine.run(data, props)
    organ = np.isin(res.segmentation, engine.targets[1].labels)
    assert organ.any()
    st = mask_statistics(np.zeros_like(res.cams['organ']), organ, props['spacing'], 5.0)
    assert st == {'energy_in_mask': None, 'energy_in_ring': None, 'pointing_game': None,
                  'centroid_distance_mm': None, 'mask_voxels': int(organ.sum()),
                  'undefined': 'the map is zero everywhere'}
    assert mask_statistics(res.cams['organ'], organ, props['spacing'], 5.0)['centroid_distance_mm'] >= 0


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


def test_a_baseline_that_does_not_lower_the_score_cannot_rank(small):
    """Deleting towards a baseline that scores as high as the original ranks nothing: the ratios are None, with the
    reason, and both scores are reported."""
    engine, data, props = small
    res = engine.run(data, props, keep_preprocessed=True)
    ev = CaseEvaluation(engine, data, res.logits, res.maps, EvaluationSettings(steps=2, seeds=1, sanity=False))
    ev.base = data.clone()  # a baseline that deletes nothing
    plan = ev.plan()['organ']
    e = ev.curves(engine.targets[1], plan['index'], plan['region'], plan['predict'])
    assert e['baseline_score'] == pytest.approx(e['original_score'], abs=1e-6)
    assert e['can_rank'] is False and 'cannot rank maps for this case' in e['cannot_rank']
    assert e['deletion_ratio'] is None and e['insertion_ratio'] is None
    assert e['deletion_auc_normalised'] is None and e['insertion_auc_normalised'] is None


def test_a_flat_map_has_an_undefined_sanity_check(model3d, small_case):
    """A class whose segmentation weights are zero has a Grad-CAM map of zeros (its gradient is zero): a constant
    map has no rank correlation, and the check says undefined, not passes."""
    pred = load_predictor(model3d, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, 'last_decoder', ['lesion'])
    data, props, _, _ = engine.preprocess([str(small_case)])
    res = engine.run(data, props, keep_preprocessed=True)
    mask = predicted_mask(res.logits, engine.targets, False)[0]
    assert mask.any()
    net = engine.networks[0]
    net.decoder.seg_layers[-1].weight[engine.targets[0].channel] = 0
    ev = CaseEvaluation(engine, data, res.logits, res.maps, EvaluationSettings(steps=1, seeds=1), target_mask=mask)
    plan = ev.plan()['lesion']
    s = ev.sanity(engine.targets[0], plan['mask'], plan['region'])
    assert s['spearman_after_decoder'] is None and s['passes'] is None
    assert s['verdict'].startswith('is UNDEFINED') and 'the trained map is flat' in s['verdict']


def test_evaluate_a_2d_model(model2d, small_case, tmp_path):
    """nnU-Net's 2D tiles name their slice by an int: the region re-prediction takes them."""
    out = tmp_path / 'out'
    assert main([str(a) for a in ['-i', small_case, '-o', out, '-m', model2d, '-f', '0', '--disable_tta',
                                  '-device', 'cpu', '--target-class', 'lesion', '--evaluate', '--eval-steps', '2',
                                  '--eval-seeds', '1', '--eval-no-sanity', '--progress', 'none']]) == 0
    e = json.loads((out / 'small_cam.json').read_text())['classes']['lesion']['evaluation']
    assert e['region_tiles'] >= 1 and len(e['deletion']) == 3
    assert e['mask_statistics']['predicted']['mask_voxels'] > 0


def test_region_prediction_of_a_2d_model_equals_its_full_run(model2d, small_case):
    """The 2D region re-prediction equals the full run's logits inside the region."""
    pred = load_predictor(model2d, [0], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, target_class='lesion')
    data, props, _, _ = engine.preprocess([str(small_case)])
    res = engine.run(data, props, keep_preprocessed=True)
    region = predicted_mask(res.logits, engine.targets, False)[0]
    assert region.any()
    got = RegionPrediction(pred, engine.networks, data, region)([data])[0]
    assert torch.allclose(got, res.logits[:, region], atol=1e-4, rtol=1e-4)


def test_evaluate_remakes_segxrescam_maps_with_their_pool_and_channel_attribution(model3d, small_case, tmp_path,
                                                                                capsys):
    """`evaluate -o` makes the earlier maps again from every map-changing option its sidecar records (SegXResCAM's
    pool size and mode here), keeps channel attribution, and refuses a sidecar that lacks one, in one line."""
    out = tmp_path / 'out'
    assert main([str(a) for a in ['-i', small_case, '-o', out, '-m', model3d, '-f', '0', '--disable_tta',
                                  '--target-class', 'organ', '--method', 'segxrescam', '--pool-size', '3',
                                  '--pool-mode', 'mean', '--channel-attribution', '-device', 'cpu',
                                  '--progress', 'none']]) == 0
    sidecar = out / 'small_cam.json'
    before = json.loads(sidecar.read_text())
    assert (before['pool_size'], before['pool_mode'], before['channel_attribution']) == (3, 'mean', True)
    cam = sitk.GetArrayFromImage(read(out / before['cams']['organ']))
    assert main(['evaluate', '-o', str(out), '--eval-steps', '1', '--eval-seeds', '1', '--eval-no-sanity',
                 '-device', 'cpu', '--progress', 'none']) == 0
    after = json.loads(sidecar.read_text())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read(out / after['cams']['organ'])), cam)
    assert after['classes']['organ']['channel_attribution'] == before['classes']['organ']['channel_attribution']
    assert 'deletion_auc' in after['classes']['organ']['evaluation']
    del after['pool_size']
    sidecar.write_text(json.dumps(after))
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(['evaluate', '-o', str(out), '-device', 'cpu']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'does not record pool_size' in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
