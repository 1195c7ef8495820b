"""xwin.io: volumes and radiographs in and out."""


import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from xwin.io import (
    Volume,
    XwinIOError,
    crop_or_pad,
    load_radiograph,
    load_volume,
    resample,
    save_volume,
)
from xwin.data import SAMPLE_DIR

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def oblique_affine(spacing=(0.8, 1.3, 2.5), flips=(-1, 1, -1), angle=0.4, origin=(12.0, -40.0, 55.0)):
    A = np.eye(4)
    A[:3, :3] = rotation((1, 2, 3), angle) @ np.diag(np.asarray(flips) * np.asarray(spacing))
    A[:3, 3] = origin
    return A


# --------------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------------


def test_volume_properties():
    A = oblique_affine()
    v = Volume(torch.zeros(5, 7, 9), A)
    assert v.shape == (5, 7, 9)
    np.testing.assert_allclose(v.spacing, [0.8, 1.3, 2.5], rtol=1e-12)
    expected_center = A[:3, :3] @ np.array([2.0, 3.0, 4.0]) + A[:3, 3]
    np.testing.assert_allclose(v.center_world, expected_center, rtol=1e-12)
    assert v.affine.dtype == np.float64
    w = v.with_data(torch.ones(5, 7, 9))
    assert torch.all(w.data == 1) and np.array_equal(w.affine, A) and w.affine is not v.affine
    with pytest.raises(ValueError, match="spatial shape"):
        v.with_data(torch.ones(5, 7, 8))
    assert v.to(torch.float64).data.dtype == torch.float64
    ijk = np.array([[1.0, 2.0, 3.0], [4.0, 0.5, 8.0]])
    np.testing.assert_allclose(v.world_to_voxel(v.voxel_to_world(ijk)), ijk, atol=1e-10)
    with pytest.raises(ValueError):
        Volume(torch.zeros(4, 4), np.eye(4))
    with pytest.raises(ValueError, match="singular"):
        Volume(torch.zeros(4, 4, 4), np.diag([1.0, 0.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_data_and_affine(tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(6, 5, 4, generator=g) * 300
    A = oblique_affine()
    path = tmp_path / f"v{suffix}"
    save_volume(Volume(data, A), path)
    back = load_volume(path)
    assert back.data.dtype == torch.float32
    assert torch.equal(back.data, data)
    np.testing.assert_allclose(back.affine, A, atol=1e-6)
    # int16 on disk keeps integer HU exactly
    hu = torch.randint(-1024, 3000, (6, 5, 4), generator=g).float()
    save_volume(Volume(hu, A), tmp_path / "i.nii.gz", dtype=np.int16)
    assert nib.load(str(tmp_path / "i.nii.gz")).get_data_dtype() == np.int16
    assert torch.equal(load_volume(tmp_path / "i.nii.gz").data, hu)


def test_nifti_scl_slope_and_inter_applied(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii"))
    v = load_volume(tmp_path / "s.nii")
    np.testing.assert_array_equal(v.data.numpy(), raw * 2.0 - 1024.0)


def test_oblique_flipped_nifti_marked_voxel_lands_at_its_world_position(tmp_path):
    spacing, flips, origin = (0.8, 1.3, 2.5), (-1, 1, -1), (12.0, -40.0, 55.0)
    R = rotation((1, 2, 3), 0.4)
    A = oblique_affine(spacing, flips, 0.4, origin)
    data = np.full((11, 9, 7), -1000, dtype=np.int16)
    mark = (8, 2, 5)
    data[mark] = 1000
    img = nib.Nifti1Image(data, A)
    img.header.set_data_dtype(np.int16)
    nib.save(img, str(tmp_path / "obl.nii.gz"))

    v = load_volume(tmp_path / "obl.nii.gz")
    found = tuple(int(i) for i in np.unravel_index(int(torch.argmax(v.data)), v.shape))
    assert found == mark  # no silent reorientation of the array
    # World position computed by hand from rotation, flips, spacing and origin.
    expected = np.asarray(origin) + R @ (np.asarray(flips) * np.asarray(spacing) * np.asarray(mark))
    np.testing.assert_allclose(v.voxel_to_world(found), expected, atol=1e-4)
    np.testing.assert_allclose(v.world_to_voxel(expected), mark, atol=1e-4)


def test_nifti_with_trailing_singleton_dim_loads_as_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(tmp_path / "t.nii"))
    assert load_volume(tmp_path / "t.nii").shape == (4, 5, 6)


# --------------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------------


def write_dicom_slice(path, pixels, ipp, iop, pixel_spacing, series_uid, instance, intercept=-1024.0, slope=1.0,
                      study_uid="1.2.3.4", extra=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for k, val in (extra or {}).items():
        setattr(ds, k, val)
    ds.save_as(str(path), enforce_file_format=True) if _PYDICOM3 else ds.save_as(str(path), write_like_original=False)


_PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3


def make_series(folder, n=6, rows=5, cols=4, shuffle_seed=0, skip=(), series_uid=None, order_names=True):
    """An oblique CT series; returns (pixels (n, rows, cols), ipp (n, 3), row_cos, col_cos, ps)."""
    folder.mkdir(parents=True, exist_ok=True)
    R = rotation((0.3, -0.5, 1.0), 0.35)
    row_cos, col_cos = R[:, 0], R[:, 1]
    normal = np.cross(row_cos, col_cos)
    ps = (0.7, 0.9)  # (row spacing, column spacing)
    origin = np.array([-100.0, 80.0, 30.0])
    rng = np.random.default_rng(shuffle_seed)
    pixels = rng.integers(0, 3000, size=(n, rows, cols)).astype(np.uint16)
    ipp = np.array([origin + k * 2.0 * normal for k in range(n)])
    series_uid = series_uid or generate_uid()
    order = rng.permutation(n)  # file names and instance numbers unrelated to position
    for name_idx, k in enumerate(order):
        if k in skip:
            continue
        write_dicom_slice(folder / f"IM{name_idx:04d}.dcm", pixels[k], ipp[k], list(row_cos) + list(col_cos), ps,
                          series_uid, instance=int(rng.integers(1, 1000)))
    return pixels, ipp, row_cos, col_cos, ps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dicom_series_any_file_order_gives_right_data_and_affine(tmp_path, seed):
    folder = tmp_path / "series"
    pixels, ipp, row_cos, col_cos, ps = make_series(folder, shuffle_seed=seed)
    v = load_volume(folder)
    n, rows, cols = pixels.shape
    assert v.shape == (cols, rows, n)
    # data[i, j, k] = slice_k[row j, column i] * slope + intercept
    np.testing.assert_array_equal(v.data.numpy(), pixels.transpose(2, 1, 0).astype(np.float32) - 1024.0)
    # Every voxel's world position: LPS position from the DICOM definition, then x, y negated (RAS+).
    for (i, j, k) in [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2, 0, 4)]:
        lps = ipp[k] + i * ps[1] * row_cos + j * ps[0] * col_cos
        ras = lps * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(v.voxel_to_world((i, j, k)), ras, atol=1e-6)
    np.testing.assert_allclose(v.spacing, [0.9, 0.7, 2.0], atol=1e-9)
    # A single file of the series loads the whole series too.
    v2 = load_volume(next(folder.iterdir()))
    assert torch.equal(v2.data, v.data) and np.allclose(v2.affine, v.affine)


def test_dicom_per_slice_rescale_applied(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    uid = generate_uid()
    for k in range(3):
        px = np.full((3, 3), 100 + k, dtype=np.uint16)
        write_dicom_slice(folder / f"{k}.dcm", px, (0, 0, 3.0 * k), (1, 0, 0, 0, 1, 0), (1, 1), uid, k + 1,
                          intercept=-1000.0 - k, slope=2.0)
    v = load_volume(folder)
    for k in range(3):
        assert torch.all(v.data[:, :, k] == 2.0 * (100 + k) - 1000.0 - k)
    # axial LPS identity orientation -> RAS affine diag(-1, -1, 3)
    np.testing.assert_allclose(v.affine[:3, :3], np.diag([-1.0, -1.0, 3.0]), atol=1e-9)


def test_dicom_folder_with_two_series_is_an_error_naming_folder(tmp_path):
    folder = tmp_path / "mixed"
    make_series(folder, n=3, series_uid="1.2.826.0.1.1")
    # second series: different file names
    sub = tmp_path / "tmp2"
    make_series(sub, n=3, series_uid="1.2.826.0.1.2")
    for f in sub.iterdir():
        f.rename(folder / ("B" + f.name))
    with pytest.raises(XwinIOError, match="mixed series") as e:
        load_volume(folder)
    assert str(folder) in str(e.value) and "1.2.826.0.1.1" in str(e.value) and "1.2.826.0.1.2" in str(e.value)
    # picking one series works
    assert load_volume(folder, series="1.2.826.0.1.2").shape[2] == 3


def test_dicom_missing_slice_reported(tmp_path):
    folder = tmp_path / "gap"
    make_series(folder, n=7, skip=(3,))
    with pytest.raises(XwinIOError, match="missing slices") as e:
        load_volume(folder)
    assert str(folder) in str(e.value) and "1 slice(s) missing" in str(e.value)


def test_dicom_duplicate_positions_reported(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.0, 2.0, 4.0]):
        write_dicom_slice(folder / f"{k}.dcm", np.zeros((2, 2)), (0, 0, z), (1, 0, 0, 0, 1, 0), (1, 1), uid, k)
    with pytest.raises(XwinIOError, match="duplicate slice positions"):
        load_volume(folder)


def test_dicom_single_slice_is_2d_error(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    write_dicom_slice(folder / "a.dcm", np.zeros((4, 4)), (0, 0, 0), (1, 0, 0, 0, 1, 0), (1, 1), generate_uid(), 1)
    with pytest.raises(XwinIOError, match="2D image given as a volume") as e:
        load_volume(folder)
    assert str(folder) in str(e.value)


def test_empty_folder_error(tmp_path):
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(XwinIOError, match="no DICOM files") as e:
        load_volume(tmp_path)
    assert str(tmp_path) in str(e.value)


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.nii.gz"
    for fn in (load_volume, load_radiograph):
        with pytest.raises(XwinIOError, match="not found") as e:
            fn(p)
        assert str(p) in str(e.value)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("this is not a CT scan\n" * 40)
    with pytest.raises(XwinIOError, match="not a volume file") as e:
        load_volume(p)
    assert str(p) in str(e.value)
    with pytest.raises(XwinIOError, match="not an image") as e:
        load_radiograph(p)
    assert str(p) in str(e.value)
    q = tmp_path / "fake.nii"
    q.write_text("x" * 400)
    with pytest.raises(XwinIOError, match="not a NIfTI file") as e:
        load_volume(q)
    assert str(q) in str(e.value)
    assert isinstance(e.value, ValueError)  # XwinIOError is a ValueError


def test_truncated_gzip(tmp_path):
    good = tmp_path / "good.nii.gz"
    save_volume(Volume(torch.randn(16, 16, 16), np.eye(4)), good)
    bad = tmp_path / "bad.nii.gz"
    blob = good.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(XwinIOError, match="truncated") as e:
        load_volume(bad)
    assert str(bad) in str(e.value)


def test_2d_image_given_as_volume(tmp_path):
    png = tmp_path / "xray.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    with pytest.raises(XwinIOError, match="2D image given as a volume") as e:
        load_volume(png)
    assert str(png) in str(e.value) and "load_radiograph" in str(e.value)
    nii = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(nii))
    with pytest.raises(XwinIOError, match="2D image given as a volume") as e:
        load_volume(nii)
    assert str(nii) in str(e.value)
    # and a volume given as a radiograph
    with pytest.raises(XwinIOError, match="NIfTI volume") as e:
        load_radiograph(nii)


def test_save_volume_rejects_other_formats(tmp_path):
    with pytest.raises(XwinIOError, match=".nii"):
        save_volume(Volume(torch.zeros(2, 2, 2), np.eye(4)), tmp_path / "v.mha")


# --------------------------------------------------------------------------------------------------
# resample, crop_or_pad
# --------------------------------------------------------------------------------------------------


def linear_field(vol_shape, A, coef=(0.7, -1.3, 2.1), c0=5.0):
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in vol_shape], indexing="ij")
    ijk = np.stack([ii, jj, kk], -1).astype(np.float64)
    xyz = ijk @ A[:3, :3].T + A[:3, 3]
    return xyz @ np.asarray(coef) + c0


@pytest.mark.parametrize("kw", [dict(spacing=(1.7, 0.9, 3.1)), dict(shape=(9, 20, 5)), dict(spacing=2.0, shape=(6, 6, 6))])
def test_resample_keeps_world_centre_and_linear_field(kw):
    A = oblique_affine()
    shape = (12, 15, 8)
    f = linear_field(shape, A)
    v = Volume(torch.from_numpy(f.astype(np.float64)), A)
    r = resample(v, **kw)
    np.testing.assert_allclose(r.center_world, v.center_world, atol=1e-9)
    # Directions unchanged; spacing as asked
    dirs_old = A[:3, :3] / v.spacing
    np.testing.assert_allclose(r.affine[:3, :3] / r.spacing, dirs_old, atol=1e-12)
    if "spacing" in kw:
        np.testing.assert_allclose(r.spacing, np.broadcast_to(kw["spacing"], (3,)), rtol=1e-12)
    if "shape" in kw:
        assert r.shape == tuple(kw["shape"])
    if "spacing" in kw and "shape" not in kw:
        np.testing.assert_allclose(np.array(r.shape) * r.spacing, np.array(shape) * v.spacing, atol=np.max(r.spacing))
    # Trilinear interpolation reproduces a linear field exactly where new voxel centres lie inside
    # the hull of the old voxel centres.
    expected = linear_field(r.shape, r.affine)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in r.shape], indexing="ij")
    world = np.stack([ii, jj, kk], -1) @ r.affine[:3, :3].T + r.affine[:3, 3]
    old_idx = v.world_to_voxel(world)
    inside = np.all((old_idx >= -1e-9) & (old_idx <= np.array(shape) - 1 + 1e-9), axis=-1)
    assert inside.sum() > 20
    np.testing.assert_allclose(r.data.numpy()[inside], expected[inside], atol=1e-9)


def test_resample_nearest_for_labels_and_fill_outside():
    lab = torch.zeros(10, 10, 10, dtype=torch.int64)
    lab[2:5, 3:8, 4:9] = 7
    lab[6:9, 1:3, 1:4] = 3
    v = Volume(lab, np.diag([2.0, 2.0, 2.0, 1.0]))
    r = resample(v, spacing=1.0)
    assert r.data.dtype == torch.int64 and r.shape == (20, 20, 20)
    assert set(torch.unique(r.data).tolist()) == {0, 3, 7}
    # label volume (count x voxel volume) preserved exactly for an integer refinement
    assert (r.data == 7).sum().item() * 1.0 == (lab == 7).sum().item() * 8.0
    # A bigger grid around the same centre: outside the old extent gets `fill`.
    f = Volume(torch.zeros(4, 4, 4), np.eye(4))
    g = resample(f, spacing=1.0, shape=(8, 8, 8), fill=-1000.0)
    assert g.data[0, 0, 0] == -1000.0 and g.data[4, 4, 4] == 0.0
    np.testing.assert_allclose(g.center_world, f.center_world)


def test_resample_downsample_real_ct_region_keeps_mean():
    ct = load_volume(SAMPLE_DIR / "ct.nii.gz")
    r = resample(ct, spacing=(5.625, 5.625, 5.0))
    assert r.shape == (64, 64, 66) or r.shape == (64, 64, 67)
    np.testing.assert_allclose(r.center_world, ct.center_world, atol=1e-9)
    assert abs(float(r.data.mean()) - float(ct.data.mean())) < 15.0


def test_crop_or_pad_about_body_keeps_world_positions():
    data = torch.full((30, 20, 10), -1000.0)
    data[18:26, 4:10, 2:8] = 50.0  # the "body", off-centre
    A = oblique_affine()
    v = Volume(data, A)
    out = crop_or_pad(v, (12, 12, 16))
    assert out.shape == (12, 12, 16)
    # body fully kept and centred; padding filled with -1000
    assert (out.data == 50.0).sum() == (data == 50.0).sum()
    body = torch.nonzero(out.data == 50.0).double().mean(0).numpy()
    np.testing.assert_allclose(body, (np.array([12, 12, 16]) - 1) / 2, atol=0.51)
    assert out.data[0, 0, 0] == -1000.0
    # every output voxel's world position holds the same value as the source at that position
    for idx in [(0, 0, 3), (5, 6, 7), (11, 11, 12), (3, 8, 9)]:
        src = np.round(v.world_to_voxel(out.voxel_to_world(idx))).astype(int)
        if np.all((src >= 0) & (src < np.array(v.shape))):
            assert out.data[idx] == v.data[tuple(src)]
        else:
            assert out.data[idx] == -1000.0
    # explicit centre (voxel index)
    c = crop_or_pad(v, (4, 4, 4), center=(1.5, 1.5, 1.5))
    np.testing.assert_allclose(c.affine[:3, 3], A[:3, 3], atol=1e-9)
    assert torch.equal(c.data, data[:4, :4, :4])


# --------------------------------------------------------------------------------------------------
# Radiographs
# --------------------------------------------------------------------------------------------------


def test_real_radiograph_dense_structures_bright():
    r = load_radiograph(SAMPLE_DIR / "radiograph.png")
    assert r.shape == (512, 482) and r.dtype == torch.float32
    assert 0.0 <= float(r.min()) and float(r.max()) <= 1.0
    mediastinum = r[150:300, 225:255].median()  # spine / mediastinum, centre of the chest
    right_lung = r[150:300, 100:170].median()  # image left = patient's right on a PA film
    left_lung = r[150:300, 310:380].median()
    assert mediastinum > right_lung + 0.15 and mediastinum > left_lung + 0.15
    # resize
    assert load_radiograph(SAMPLE_DIR / "radiograph.png", size=224).shape == (224, 224)
    small = load_radiograph(SAMPLE_DIR / "radiograph.png", size=(128, 120))
    assert small.shape == (128, 120)
    assert small[37:75, 56:64].median() > small[37:75, 25:43].median() + 0.1


def _write_dx(path, pixels, photometric="MONOCHROME2", extra=None, ts=ExplicitVRLittleEndian, pixel_bytes=None,
              bits=16):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = pixel_bytes if pixel_bytes is not None else pixels.astype(np.uint16).tobytes()
    if pixel_bytes is not None:
        ds["PixelData"].VR = "OB"
    if _PYDICOM3:
        ds.save_as(str(path), enforce_file_format=True)
    else:
        ds.save_as(str(path), write_like_original=False)


def test_dicom_radiograph_monochrome1_window_and_rescale(tmp_path):
    px = np.array([[0, 1000, 2000], [3000, 4000, 4095]], dtype=np.uint16)
    # MONOCHROME1 with a window: low stored value = white = dense
    _write_dx(tmp_path / "m1.dcm", px, "MONOCHROME1", {"WindowCenter": 2000, "WindowWidth": 4001}, bits=12)
    r = load_radiograph(tmp_path / "m1.dcm").numpy()
    lin = np.clip((px - (2000 - 0.5)) / 4000 + 0.5, 0, 1)
    np.testing.assert_allclose(r, 1 - lin, atol=1e-6)
    assert r[0, 0] > r[1, 2]
    # MONOCHROME2 with rescale and a narrow window clipping both ends
    _write_dx(tmp_path / "m2.dcm", px, "MONOCHROME2",
              {"RescaleSlope": 2.0, "RescaleIntercept": -100.0, "WindowCenter": 4000, "WindowWidth": 2001}, bits=12)
    r2 = load_radiograph(tmp_path / "m2.dcm").numpy()
    x = px * 2.0 - 100.0
    np.testing.assert_allclose(r2, np.clip((x - 3999.5) / 2000 + 0.5, 0, 1), atol=1e-6)
    assert r2[0, 0] == 0.0 and r2[1, 2] == 1.0
    # No window: full range
    _write_dx(tmp_path / "m3.dcm", px, "MONOCHROME2", bits=12)
    r3 = load_radiograph(tmp_path / "m3.dcm").numpy()
    np.testing.assert_allclose(r3, px / 4095.0, atol=1e-6)
    # SIGMOID VOI function
    _write_dx(tmp_path / "m4.dcm", px, "MONOCHROME2",
              {"WindowCenter": 2000, "WindowWidth": 1000, "VOILUTFunction": "SIGMOID"}, bits=12)
    r4 = load_radiograph(tmp_path / "m4.dcm").numpy()
    np.testing.assert_allclose(r4, 1 / (1 + np.exp(-4 * (px - 2000.0) / 1000)), atol=1e-6)


def test_dicom_radiograph_missing_decoder_named(tmp_path):
    from pydicom.encaps import encapsulate

    p = tmp_path / "jls.dcm"
    px = np.zeros((8, 8), np.uint16)
    _write_dx(p, px, ts=pydicom.uid.JPEGLSLossless, pixel_bytes=encapsulate([b"\xff\xd8" + b"\x00" * 62]))
    with pytest.raises(XwinIOError, match="JPEG-LS") as e:
        load_radiograph(p)
    assert str(p) in str(e.value)
    assert "cannot decode" in str(e.value)


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "rgb"])
def test_raster_radiographs(tmp_path, kind):
    ramp = np.linspace(0, 1, 64)[None, :] * np.ones((48, 1))
    if kind == "png8":
        p = tmp_path / "a.png"
        Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(p)
        tol = 0.5 / 255
    elif kind == "png16":
        p = tmp_path / "a.png"
        Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(p)
        tol = 0.5 / 65535
    elif kind == "jpeg":
        p = tmp_path / "a.jpg"
        Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(p, quality=95)
        tol = 4 / 255
    else:
        p = tmp_path / "a.png"
        g = np.round(ramp * 255).astype(np.uint8)
        Image.fromarray(np.stack([g, g, g], -1)).save(p)
        tol = 1 / 255
    r = load_radiograph(p)
    assert r.shape == (48, 64) and r.dtype == torch.float32
    np.testing.assert_allclose(r.numpy(), ramp, atol=tol)


def test_truncated_png(tmp_path):
    good = tmp_path / "g.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 65535).astype(np.uint16)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(XwinIOError, match="truncated or corrupt") as e:
        load_radiograph(bad)
    assert str(bad) in str(e.value)


def test_dicom_radiograph_voi_lut_sequence(tmp_path):
    px = np.array([[0, 100, 1600], [2000, 4000, 4095]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [int(v) for v in np.arange(4096) // 16]
    item["LUTData"].VR = "US"
    _write_dx(tmp_path / "lut.dcm", px, "MONOCHROME2", {"VOILUTSequence": [item]}, bits=12)
    r = load_radiograph(tmp_path / "lut.dcm").numpy()
    np.testing.assert_allclose(r, (px // 16) / 255.0, atol=1e-6)


def test_dicom_radiograph_modality_lut_then_window(tmp_path):
    px = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [6, 0, 16]
    item.LUTData = [0, 100, 400, 900, 1600, 2500]
    item["LUTData"].VR = "US"
    _write_dx(tmp_path / "mlut.dcm", px, "MONOCHROME2",
              {"ModalityLUTSequence": [item], "WindowCenter": 1250, "WindowWidth": 2501}, bits=12)
    r = load_radiograph(tmp_path / "mlut.dcm").numpy()
    x = np.array([[0, 100, 400], [900, 1600, 2500]], dtype=np.float64)
    np.testing.assert_allclose(r, np.clip((x - 1249.5) / 2500 + 0.5, 0, 1), atol=1e-6)
