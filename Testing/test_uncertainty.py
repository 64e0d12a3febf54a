"""How sure, next to why: nnU-Net's probabilities (--save_probabilities) and the ensemble's uncertainty maps
(--save-uncertainty) from the same pass. The maths on constructed probabilities; the files on the tiny models."""
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import HALF_ROUNDOFF, assert_equals_nnunet, geometry, kind_model, logits_pair, nnunet_predict, read
from nnunetv2_cam_core.cli import main
from nnunetv2_cam_core.demo import SPACING, write_sample_case
from nnunetv2_cam_core.uncertainty import TileUncertainty, UncertaintyStitch, entropy, probabilities

FLOAT32_SLACK = 1e-6  # float32 rounding of sums of a few probabilities and logs


def fannes(tv: np.ndarray, k: int) -> np.ndarray:
    """Fannes-Audenaert: |H(p) - H(q)| <= T log(K - 1) + h(T) for the total variation T = |p - q|_1 / 2 (nats),
    T <= 1 - 1/K; beyond that the bound is log K. K = 2: h(T) alone."""
    t = np.clip(tv, 0, 1)
    h = -(np.where(t > 0, t * np.log(np.maximum(t, 1e-300)), 0) +
          np.where(t < 1, (1 - t) * np.log(np.maximum(1 - t, 1e-300)), 0))
    return np.where(t <= 1 - 1 / k, t * math.log(max(k - 1, 1)) + h, math.log(k))


# --- the maths, on constructed probabilities ---
def test_entropy_is_zero_for_one_hot_members_maximal_for_uniform_and_in_between_otherwise():
    k = 4
    one_hot = torch.eye(k)[:, :, None]  # (members: each class once, classes, 1 voxel) -> per member one-hot
    assert torch.equal(entropy(one_hot, False, dim=1), torch.zeros(k, 1, 1))
    assert torch.equal(entropy(one_hot[0], False), torch.zeros(1, 1))
    uniform = torch.full((k, 1), 1 / k)
    assert float(entropy(uniform, False)) == pytest.approx(math.log(k), rel=1e-6)
    p = torch.softmax(torch.randn(k, 1000, generator=torch.Generator().manual_seed(0)) * 3, 0)
    h = entropy(p, False)
    assert bool((h >= 0).all()) and bool((h <= math.log(k) + FLOAT32_SLACK).all())
    # regions: the binary entropy of each sigmoid, 0 at 0 and 1, log 2 at 1/2
    r = torch.tensor([[0.0, 1.0, 0.5, 0.2]])
    assert torch.allclose(entropy(r, True), torch.tensor([[0, 0, math.log(2), 0.5004024]]), atol=1e-6)


def test_members_that_agree_on_one_hot_have_no_entropy_or_spread():
    """Every member certain of the same class: entropy, MI and std are all exactly 0."""
    logits = torch.full((6, 3, 5), -200.0)
    logits[:, 1] = 200.0  # softmax is one-hot in float32
    t = TileUncertainty.of(logits, False, [1, 2])
    assert torch.equal(entropy(t.mean, False), torch.zeros(1, 5))
    assert torch.equal(t.mutual_info, torch.zeros(1, 5)) and torch.equal(t.variance, torch.zeros(2, 5))


def test_members_certain_of_different_classes_are_all_mutual_information():
    """Half the members one-hot on class 0, half on class 1: each member's entropy is 0, so MI = H(mean) = log 2."""
    logits = torch.full((4, 3, 1), -200.0)
    logits[:2, 0] = logits[2:, 1] = 200.0
    t = TileUncertainty.of(logits, False, [0])
    assert float(t.mutual_info) == pytest.approx(math.log(2), rel=1e-6)
    assert float(t.variance.sqrt()) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize('regions', [False, True])
def test_mutual_information_between_zero_and_entropy_and_std_is_the_members_spread(regions):
    g = torch.Generator().manual_seed(1)
    members = torch.randn(8, 3, 2000, generator=g) * 4
    t = TileUncertainty.of(members, regions, [0, 2])
    h = entropy(t.mean, regions)
    assert bool((t.mutual_info >= -FLOAT32_SLACK).all()) and bool((t.mutual_info <= h + FLOAT32_SLACK).all())
    p = probabilities(members, regions, dim=1)
    assert torch.allclose(t.variance.sqrt(), p[:, [0, 2]].std(0, unbiased=False), atol=1e-6)
    assert torch.allclose(t.mean, p.mean(0), atol=1e-7)


@pytest.mark.parametrize('regions', [False, True])
def test_one_member_has_exactly_zero_mutual_information_and_spread(regions):
    members = torch.randn(1, 3, 500, generator=torch.Generator().manual_seed(2)) * 4
    t = TileUncertainty.of(members, regions, [0, 1, 2])
    assert torch.equal(t.mutual_info, torch.zeros_like(t.mutual_info))
    assert torch.equal(t.variance, torch.zeros_like(t.variance))


@pytest.mark.parametrize('regions', [False, True])
def test_stitched_over_overlapping_tiles_mi_stays_below_the_entropy_of_the_stitched_mean(regions):
    """Two overlapping 1D tiles with gaussian-like weights: the stitched MI is the weighted mean of the tiles' MI,
    the stitched P the weighted mean of theirs, and MI <= H(P) holds voxel by voxel (concavity of H)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.tensor([0.2, 1.0, 3.0, 1.0, 0.2])
    slicers = [(slice(None), slice(0, 5)), (slice(None), slice(3, 8))]
    stitch = UncertaintyStitch(3, regions, [1], (8,), 4, torch.device('cpu'))
    total = torch.zeros(8)
    tiles = []
    for sl in slicers:
        members = torch.randn(4, 3, 5, generator=g) * 5
        stitch.add(members, sl, weight)
        total[sl[1]] += weight
        tiles.append(TileUncertainty.of(members, regions, [1]))
    maps = stitch.finish(total)
    both = 3  # voxel 3 and 4 are in both tiles: voxel 3 is at weight 1.0 in tile 0 and 0.2 in tile 1
    w0, w1 = weight[3] / (weight[3] + weight[0]), weight[0] / (weight[3] + weight[0])
    assert torch.allclose(maps.mutual_info[:, both], w0 * tiles[0].mutual_info[:, 3] + w1 * tiles[1].mutual_info[:, 0],
                          atol=1e-6)
    assert bool((maps.mutual_info <= maps.entropy + FLOAT32_SLACK).all())
    assert bool((maps.mutual_info >= -FLOAT32_SLACK).all()) and bool((maps.prob_std >= 0).all())


# --- the files, on the tiny models ---
def cli(model, inputs, out, *extra):
    return main([str(a) for a in ('-i', inputs, '-o', out, '-m', model, '-device', 'cpu', '--progress', 'json',
                                   *extra)])


def probability_bound(pair, lipschitz: float) -> np.ndarray:
    """Per voxel of the original geometry, how far our CASE.npz may lie from nnUNetv2_predict's. Ours is the
    softmax (sigmoid) of our logits, nnU-Net's of its float16-accumulated ones, both after the same resampling. The
    logits differ by at most the float16 rounding bound (`LogitsPair.rounding_bound`) plus our distance to nnU-Net's
    float32-accumulated logits (1e-5 of the largest); linear resampling (order 1, as the plan must say) takes convex
    combinations, so the resampled bound bounds the resampled difference, and nnU-Net stores its resampled logits in
    float16 (one more rounding, 2^-11 of the largest); softmax moves by at most 1/2 of its input's change (sigmoid
    1/4); plus float32 rounding."""
    from nnunetv2_cam_core.export import maps_to_original
    kwargs = pair.predictor.configuration_manager.configuration['resampling_fn_probabilities_kwargs']
    assert kwargs['order'] <= 1 and kwargs.get('order_z', 0) <= 1, 'the bound needs linear resampling'
    logit_bound = pair.rounding_bound + 1e-5 * float(pair.nnunet32.abs().max())
    resampled = maps_to_original(logit_bound[None].float(), pair.properties, pair.predictor)[0]
    return lipschitz * (resampled + HALF_ROUNDOFF * float(pair.nnunet.abs().max())) + FLOAT32_SLACK


def assert_probabilities_equal_nnunet(ours: Path, theirs: Path, case: str, pair) -> float:
    """Same files, same layout; probabilities within `probability_bound`. Returns the largest difference."""
    a, b = np.load(ours / f'{case}.npz'), np.load(theirs / f'{case}.npz')
    assert list(a.keys()) == list(b.keys()) == ['probabilities']
    pa, pb = a['probabilities'], b['probabilities']
    assert pa.shape == pb.shape and pa.dtype == pb.dtype
    has_regions = pair.predictor.label_manager.has_regions
    bound = probability_bound(pair, 0.25 if has_regions else 0.5)
    diff = np.abs(pa.astype(np.float64) - pb)
    assert bool((diff <= bound[None]).all()), f'{int((diff > bound[None]).sum())} values beyond the bound'
    with open(ours / f'{case}.pkl', 'rb') as f, open(theirs / f'{case}.pkl', 'rb') as g:
        pka, pkb = pickle.load(f), pickle.load(g)
    assert pka.keys() == pkb.keys()
    for key in ('spacing', 'shape_before_cropping', 'bbox_used_for_cropping',
                'shape_after_cropping_and_before_resampling'):
        assert np.array_equal(np.asarray(pka[key]), np.asarray(pkb[key])), key
    return float(diff.max())


@pytest.fixture(scope='module')
def tta_case(tmp_path_factory) -> Path:
    """A few tiles (8 at step 0.5), spacing unlike the plan's (resampled)."""
    return write_sample_case(tmp_path_factory.mktemp('tta_case'), seed=5, shape=(24, 52, 52), name='tta')


@pytest.fixture(scope='module')
def tta_run(model3d, tta_case, tmp_path_factory):
    """Two folds with TTA (16 members), probabilities and uncertainty in one run."""
    out = tmp_path_factory.mktemp('tta_out')
    assert cli(model3d, tta_case, out, '-f', '0', '1', '--target-class', 'lesion', 'organ', '--save_probabilities',
               '--save-uncertainty') == 0
    return out


def test_3d_two_folds_tta_probabilities_equal_nnunet_predict(model3d, tta_case, tta_run, tmp_path):
    ref = nnunet_predict(model3d, tta_case.parent, tmp_path / 'ref', [0, 1], tta=True, save_probabilities=True)
    pair = logits_pair(model3d, [0, 1], tta_case, tta=True)
    biggest = assert_probabilities_equal_nnunet(tta_run, ref, 'tta', pair)
    differing, eps = assert_equals_nnunet(sitk.GetArrayFromImage(read(tta_run / 'tta.nii.gz')),
                                          sitk.GetArrayFromImage(read(ref / 'tta.nii.gz')), pair)
    print(f'\n3d_fullres folds 0 1 TTA: probabilities differ from nnUNetv2_predict by at most {biggest:.3g}, '
          f'{differing} segmentation voxels differ, logits by {eps:.3g}')


def test_2d_probabilities_equal_nnunet_predict(model2d, small_case, tmp_path):
    out = tmp_path / 'ours'
    assert cli(model2d, small_case, out, '-f', '0', '--save-probabilities') == 0
    ref = nnunet_predict(model2d, small_case.parent, tmp_path / 'ref', [0], tta=True, save_probabilities=True)
    biggest = assert_probabilities_equal_nnunet(out, ref, 'small', logits_pair(model2d, [0], small_case, tta=True))
    print(f'\n2d TTA: probabilities differ from nnUNetv2_predict by at most {biggest:.3g}')


@pytest.fixture(scope='module')
def regions_case(tmp_path_factory):
    from nnunetv2_cam_core.model_kinds import write_kind_case
    return write_kind_case('regions', tmp_path_factory.mktemp('regions_case'))


def test_region_probabilities_equal_nnunet_predict_and_uncertainty_is_per_region(regions_case, tmp_path):
    model = kind_model('regions')
    out = tmp_path / 'ours'
    assert cli(model, regions_case, out, '-f', '0', '--disable_tta', '--target-class', 'kidney', 'tumor',
               '--save_probabilities', '--save-uncertainty') == 0
    ref = nnunet_predict(model, regions_case, tmp_path / 'ref', [0], tta=False, save_probabilities=True)
    files = sorted(str(f) for f in regions_case.iterdir() if f.is_file())
    biggest = assert_probabilities_equal_nnunet(out, ref, 'case', logits_pair(model, [0], files))
    print(f'\nregions: probabilities differ from nnUNetv2_predict by at most {biggest:.3g}')
    side = json.loads((out / 'case_cam.json').read_text())
    names = set(side['uncertainty']['files'])
    assert names == {'entropy_kidney', 'entropy_masses', 'entropy_tumor', 'mutualinfo_kidney', 'mutualinfo_masses',
                     'mutualinfo_tumor', 'probstd_kidney', 'probstd_tumor'}
    for name in names:
        img = read(out / side['uncertainty']['files'][name])
        assert geometry(img) == geometry(read(files[0]))
        arr = sitk.GetArrayFromImage(img)
        if name.startswith('entropy'):
            assert arr.min() >= 0 and arr.max() <= math.log(2) + FLOAT32_SLACK and arr.max() > 0
        else:  # one member
            assert not arr.any(), name


def test_uncertainty_maps_hold_their_bounds_and_the_sidecar_summarises_them(tta_run, tta_case):
    side = json.loads((tta_run / 'tta_cam.json').read_text())
    u = side['uncertainty']
    assert u['members'] == 16 and u['ring_mm'] == 5.0
    maps = {n: sitk.GetArrayFromImage(read(tta_run / f)) for n, f in u['files'].items()}
    assert set(maps) == {'entropy', 'mutualinfo', 'probstd_lesion', 'probstd_organ'}
    assert geometry(read(tta_run / u['files']['entropy'])) == geometry(read(tta_case))
    h, mi = maps['entropy'], maps['mutualinfo']
    k = 3  # background, lesion, organ
    assert h.min() >= 0 and h.max() <= math.log(k) + FLOAT32_SLACK and h.max() > 0
    assert mi.min() >= 0 and bool((mi <= h + FLOAT32_SLACK).all()) and mi.max() > 0
    for name in ('probstd_lesion', 'probstd_organ'):
        assert maps[name].min() >= 0 and maps[name].max() <= 0.5 + FLOAT32_SLACK and maps[name].max() > 0
    seg = sitk.GetArrayFromImage(read(tta_run / 'tta.nii.gz'))
    for name, label in (('lesion', 1), ('organ', 2)):
        st = side['classes'][name]['uncertainty']
        own = seg == label
        assert own.any()
        assert st['entropy_in_mask'] == pytest.approx(h[own].mean(dtype=np.float64), rel=1e-6)
        assert st['mutualinfo_in_mask'] == pytest.approx(mi[own].mean(dtype=np.float64), rel=1e-6, abs=1e-9)
        assert st['uncertain_share_in_mask'] == pytest.approx((h[own] > math.log(k) / 2).mean())
        assert st['max_entropy'] == pytest.approx(math.log(k))
        assert 0 <= st['entropy_in_ring'] <= math.log(k)


def test_one_member_writes_entropy_and_says_in_one_line_why_mi_is_zero(model3d, small_case, tmp_path, capsys):
    out = tmp_path / 'out'
    capsys.readouterr()
    assert cli(model3d, small_case, out, '-f', '0', '--disable_tta', '--save-uncertainty') == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    said = [e['message'] for e in events if e['event'] == 'warning' and 'mutual information' in e['message']]
    assert len(said) == 1 and '\n' not in said[0] and 'one member (one fold, no TTA mirrors)' in said[0]
    side = json.loads((out / 'small_cam.json').read_text())
    assert side['uncertainty']['members'] == 1
    files = side['uncertainty']['files']
    assert sitk.GetArrayFromImage(read(out / files['entropy'])).max() > 0
    assert not sitk.GetArrayFromImage(read(out / files['mutualinfo'])).any()
    assert not sitk.GetArrayFromImage(read(out / files['probstd_lesion'])).any()


def test_maps_from_nnunets_own_per_fold_probabilities_equal_ours(model3d, tmp_path):
    """TTA off, so the members are the folds; a case at the plan's spacing and inside one patch (one tile, no
    resampling), so each fold's CASE.npz holds that member's probabilities as they are. Two chains:
    - ours from our own per-fold files (`--save_probabilities -f F`): equal to float32 rounding;
    - ours from nnUNetv2_predict's per-fold files: these differ from our per-fold files by some d (measured; the
      probabilities test bounds it), so, as theorems: |dH| <= Fannes(K d / 2) for the entropy of the mean,
      |dMI| <= 2 Fannes(K d / 2), |dstd| <= d (a standard deviation is a seminorm)."""
    (tmp_path / 'case').mkdir()
    case = write_sample_case(tmp_path / 'case', seed=9, shape=(20, 40, 40), spacing=SPACING, name='one')
    ours = tmp_path / 'ours'
    assert cli(model3d, case, ours, '-f', '0', '1', '--disable_tta', '--target-class', 'lesion', 'organ',
               '--save-uncertainty') == 0
    side = json.loads((ours / 'one_cam.json').read_text())
    assert side['tiles'] == 1
    maps = {n: sitk.GetArrayFromImage(read(ours / f)).astype(np.float64) for n, f in side['uncertainty']['files'].items()}
    own, theirs = [], []
    for f in (0, 1):
        assert cli(model3d, case, tmp_path / f'ours{f}', '-f', f, '--disable_tta', '--save_probabilities') == 0
        own.append(np.load(tmp_path / f'ours{f}' / 'one.npz')['probabilities'].astype(np.float64))
        nnunet_predict(model3d, case.parent, tmp_path / f'ref{f}', [f], tta=False, save_probabilities=True)
        theirs.append(np.load(tmp_path / f'ref{f}' / 'one.npz')['probabilities'].astype(np.float64))

    def reference(members):
        p = np.stack(members)
        mean = p.mean(0)
        h = lambda q: -(q * np.log(np.where(q > 0, q, 1))).sum(-4)  # noqa: E731  over the classes
        return {'entropy': h(mean), 'mutualinfo': h(mean) - h(p).mean(0),
                'probstd_lesion': p[:, 1].std(0), 'probstd_organ': p[:, 2].std(0)}
    k = own[0].shape[0]
    for name, ref in reference(own).items():
        np.testing.assert_allclose(maps[name], ref, atol=1e-5, err_msg=name)
    d = max(float(np.abs(a - b).max()) for a, b in zip(own, theirs))
    h_bound = float(fannes(np.array(k * d / 2), k))
    bounds = {'entropy': h_bound, 'mutualinfo': 2 * h_bound, 'probstd_lesion': d, 'probstd_organ': d}
    for name, ref in reference(theirs).items():
        gap = float(np.abs(maps[name] - ref).max())
        assert gap <= bounds[name] + 1e-5, (name, gap, bounds[name])
        print(f'\n{name}: from nnUNetv2_predict\'s per-fold files, {gap:.3g} (bound {bounds[name]:.3g}, d = {d:.3g})')


@pytest.fixture(scope='module')
def tiling(model3d, tmp_path_factory):
    """18 tiles at step 0.5, 50 at 0.33 (two steps along z either way); two folds, no TTA."""
    from nnunetv2_cam_core.api import CamEngine
    from nnunetv2_cam_core.model import load_predictor
    case = write_sample_case(tmp_path_factory.mktemp('tiling'), seed=11, shape=(28, 100, 100), spacing=SPACING,
                             objects=6, name='tiling')
    pred = load_predictor(model3d, [0, 1], 'checkpoint_final.pth', torch.device('cpu'), use_mirroring=False)
    engine = CamEngine(pred, target_class=['lesion', 'organ'], uncertainty=True)
    data, _, _, _ = engine.preprocess([str(case)])
    return pred, engine, data


def uncertainty_at(pred, engine, data, step: float, **spec):
    from nnunetv2_cam_core.sliding_window import CamSpec, sliding_window_cam
    pred.tile_step_size = step
    try:
        return sliding_window_cam(pred, engine.networks, data, CamSpec(engine.method, engine.layers, engine.targets,
                                                                       uncertainty=True, **spec))
    finally:
        pred.tile_step_size = 0.5


def test_tiling_moves_the_entropy_no_more_than_the_probabilities_allow(tiling):
    """Step 0.5 against 0.33: the entropy map is the entropy of the stitched mean probability, so voxel by voxel it
    can change between tilings by no more than Fannes-Audenaert allows for the change of that probability (a
    theorem, so a bound that holds for any model). The theorem is for exact distributions: each component of the
    stitched P carries float32 rounding of its sums over at most n tiles, (2n + 2) 2^-24, which enters the total
    variation K times (near-certain voxels show it: the entropy's slope is unbounded at 0). Also printed: Pearson r
    of each map across the steps, beside the probabilities'."""
    pred, engine, data = tiling
    a, b = (uncertainty_at(pred, engine, data, s) for s in (0.5, 0.33))
    assert b.n_tiles > a.n_tiles
    ua, ub = a.uncertainty, b.uncertainty
    tv = 0.5 * (ua.mean_probabilities - ub.mean_probabilities).abs().sum(0).double().numpy()
    k = ua.mean_probabilities.shape[0]
    dh = (ua.entropy[0] - ub.entropy[0]).abs().double().numpy()
    rounding = (2 * b.n_tiles + 2) * 2.0 ** -24
    assert bool((dh <= fannes(tv + k * rounding, k) + FLOAT32_SLACK).all())
    for name, x, y in (('probabilities', ua.mean_probabilities, ub.mean_probabilities), ('entropy', ua.entropy,
                        ub.entropy), ('mutualinfo', ua.mutual_info, ub.mutual_info), ('probstd', ua.prob_std,
                                                                                      ub.prob_std)):
        r = float(np.corrcoef(x.flatten().double().numpy(), y.flatten().double().numpy())[0, 1])
        print(f'\nstep 0.5 vs 0.33, {name}: r = {r:.4f}, max |difference| {float((x - y).abs().max()):.3g}')


def test_low_memory_and_the_out_of_memory_retry_give_the_same_maps(tiling, monkeypatch):
    from nnunetv2_cam_core.sliding_window import _SlidingWindowRun
    pred, engine, data = tiling
    full = uncertainty_at(pred, engine, data, 0.5).uncertainty
    low = uncertainty_at(pred, engine, data, 0.5, low_memory=True).uncertainty
    original = _SlidingWindowRun._tile

    def tile(self, k, *args):  # out of memory at the third tile, after two have been added
        if not self.low_memory and k == self.tiles[2]:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return original(self, k, *args)
    monkeypatch.setattr(_SlidingWindowRun, '_tile', tile)
    retried = uncertainty_at(pred, engine, data, 0.5)
    assert retried.out_of_memory_retry
    for other in (low, retried.uncertainty):
        for x, y in ((full.mean_probabilities, other.mean_probabilities), (full.entropy, other.entropy),
                     (full.mutual_info, other.mutual_info), (full.prob_std, other.prob_std)):
            assert torch.allclose(x, y, atol=1e-6)
