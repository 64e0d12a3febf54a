"""The real-anatomy benchmark's data (benchmarks/anatomy.py) on a tiny made-up template, and the known-evidence
figures (nnunetv2_cam_core/evidence.py) on maps whose answers are known. The benchmark model itself is built by
`python benchmarks/real_anatomy.py`, never here."""
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_cam_core.evidence import energy_share, lesion_figures, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import anatomy  # noqa: E402


@pytest.fixture(scope='module')
def tpl():
    """A 48 mm head at 1 mm: a white-matter ball (probability 1 inside 14 mm, 0 beyond 17 mm) in grey matter."""
    n = 48
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing='ij')
    r = np.sqrt((z - 23.5) ** 2 + (y - 23.5) ** 2 + (x - 23.5) ** 2)
    wm = np.clip((17 - r) / 3, 0, 1).astype(np.float32)
    head = (r < 22).astype(np.float32)
    return anatomy.Template(t1=(0.4 * head + 0.4 * wm).astype(np.float32), wm=wm, gm=head - wm * head,
                            spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))


def subject(tpl, seed, **kw):
    return anatomy.make_subject(tpl, np.random.default_rng(seed), spacing=1.5, **kw)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_lesions_lie_in_white_matter_and_are_the_labelled_voxels(tpl, seed):
    s = subject(tpl, seed, lesions=4)
    assert s.instances.max() >= 1
    lesion = s.labels == anatomy.LABELS['lesion']
    # the label is the lesions' voxels, instance by instance
    assert np.array_equal(lesion, s.instances > 0)
    # inside white matter: the undeformed probability there is high (deformation moves the ball by a few mm)
    wm_now = anatomy.make_subject(tpl, np.random.default_rng(seed), spacing=1.5, lesions=0).labels
    assert (wm_now[lesion] == anatomy.LABELS['white matter']).mean() > 0.9
    # the contrast (image minus the lesion-free twin) is the lesions': far from them the two images are equal
    from scipy import ndimage
    # (the thicker slice's blur reaches 4 sigma = 4 voxels; float32 leaves a rounding rest)
    near = ndimage.binary_dilation(lesion, iterations=6)
    assert np.abs(s.contrast[~near]).max() < 1e-3 * np.abs(s.contrast).max()
    assert np.abs(s.contrast[lesion]).mean() > 10 * np.abs(s.contrast[near & ~lesion]).mean()


def test_a_seed_reproduces_its_subject_and_another_seed_does_not(tpl):
    a, b, c = subject(tpl, 5, lesions=3), subject(tpl, 5, lesions=3), subject(tpl, 6, lesions=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_the_shortcut_marker_is_bright_and_in_the_same_place_in_every_subject(tpl):
    a, b = subject(tpl, 1, lesions=0, marker=True), subject(tpl, 2, lesions=2, marker=True)
    assert a.marker is not None and np.array_equal(a.marker, b.marker) and a.marker.sum() > 0
    assert subject(tpl, 1, lesions=0).marker is None
    # the mark is no lesion and is brighter than the rest of the head
    assert not (a.labels[a.marker] == anatomy.LABELS['lesion']).any()
    assert np.median(a.image[a.marker]) > np.percentile(a.image[~a.marker], 99)


def _two_lesions():
    shape = (20, 30, 30)
    inst = np.zeros(shape, np.uint8)
    inst[8:12, 5:9, 5:9] = 1
    inst[8:12, 20:24, 20:24] = 2
    contrast = np.zeros(shape, np.float32)
    contrast[inst == 1] = np.linspace(0.1, 1.0, (inst == 1).sum())
    contrast[inst == 2] = -np.linspace(0.2, 0.8, (inst == 2).sum())  # a darker lesion counts by its size
    return inst, contrast


def test_known_evidence_figures_on_maps_with_known_answers():
    inst, contrast = _two_lesions()
    spacing = (1.0, 1.0, 1.0)
    # the map is the evidence: all energy on the lesions, every lesion hit, rank correlation 1
    rows = lesion_figures(np.abs(contrast), inst, contrast, spacing, margin_mm=3)
    assert [r['pointing'] for r in rows] == [True, True]
    assert all(r['spearman'] == pytest.approx(1.0) and r['energy'] == pytest.approx(1.0) for r in rows)
    assert summary(rows, np.abs(contrast), inst > 0) == {'lesions': 2, 'energy_on_lesions': pytest.approx(1.0),
                                                        'pointing_hit_rate': 1.0, 'spearman_median': pytest.approx(1.0)}
    # a map that looks beside the first lesion (2 voxels off its edge), and around the second more than at it,
    # least where it differs most
    cam = np.zeros_like(contrast)
    cam[8:12, 5:9, 11] = 1.0
    cam[6:14, 17:27, 17:27] = 1.0
    cam[inst == 2] = 0.9 - np.abs(contrast[inst == 2])
    rows = lesion_figures(cam, inst, contrast, spacing, margin_mm=3)
    assert rows[0]['pointing'] is False and rows[0]['energy'] == 0.0 and rows[0]['spearman'] < 0
    assert rows[1]['pointing'] is False and rows[1]['spearman'] < 0 and 0 < rows[1]['energy'] < 0.5
    s = summary(rows, cam, inst > 0)
    assert s['pointing_hit_rate'] == 0.0 and 0 < s['energy_on_lesions'] < 0.5


def test_an_empty_or_flat_map_has_no_pointing_and_no_correlation():
    inst, contrast = _two_lesions()
    rows = lesion_figures(np.zeros(inst.shape, np.float32), inst, contrast, (1.0, 1.0, 1.0))
    assert all(r['pointing'] is None and r['spearman'] is None and r['energy'] is None for r in rows)
    assert summary(rows, np.zeros(inst.shape), inst > 0) == {'lesions': 2, 'energy_on_lesions': None,
                                                             'pointing_hit_rate': None, 'spearman_median': None}
    assert energy_share(np.ones(inst.shape), inst > 0) == pytest.approx((inst > 0).mean())
