"""Volume and slice I/O: geometry survives a round trip; bad files fail with their name."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raymed.data.io import decode_nifti, read_slice, read_volume, write_volume
from raymed.errors import DataError
from tests.conftest import AFFINE


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_data_and_affine(tmp_path, suffix):
    data = np.random.default_rng(1).standard_normal((7, 8, 9)).astype(np.float32)
    path = str(tmp_path / f"vol{suffix}")
    write_volume(path, data, AFFINE)
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, data)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert back.spacing == (2.0, 2.0, 3.0)
    # nibabel (any viewer's reader) agrees on the geometry
    np.testing.assert_allclose(nib.load(path).affine, AFFINE)
    assert not list(tmp_path.glob("*.tmp-*")), "atomic write left a temporary file"


def test_missing_truncated_and_corrupt_nifti(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        read_volume(str(tmp_path / "missing.nii.gz"))
    good = tmp_path / "good.nii.gz"
    write_volume(str(good), np.ones((16, 16, 16), np.float32), AFFINE)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError, match="truncated.nii.gz: not a readable NIfTI"):
        read_volume(str(truncated))
    corrupt = tmp_path / "corrupt.nii"
    corrupt.write_bytes(b"this is not a nifti header" * 20)
    with pytest.raises(DataError, match="corrupt.nii: not a readable NIfTI"):
        read_volume(str(corrupt))
    with pytest.raises(DataError, match="not a NIfTI file"):
        read_volume(str(tmp_path / "image.txt"))


def test_truncated_uncompressed_payload(tmp_path):
    path = tmp_path / "short.nii"
    write_volume(str(path), np.ones((16, 16, 16), np.float32), AFFINE)
    raw = path.read_bytes()
    with pytest.raises(DataError, match="short.nii"):
        decode_nifti(raw[:400], str(path))


def test_read_png_and_npy_slices(tmp_path):
    array = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    Image.fromarray(array).save(tmp_path / "s.png")
    np.save(tmp_path / "s.npy", array.astype(np.float32) / 255)
    np.testing.assert_array_equal(read_slice(str(tmp_path / "s.png")), array.astype(np.float32))
    np.testing.assert_allclose(read_slice(str(tmp_path / "s.npy")), array / 255, rtol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        read_slice(str(tmp_path / "bad.png"))
    np.save(tmp_path / "vol.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(DataError, match=r"vol.npy: image has shape \(2, 2, 2, 2\)"):
        read_slice(str(tmp_path / "vol.npy"))


def test_gzip_bomb_like_garbage_is_a_data_error(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 1000))
    with pytest.raises(DataError, match="junk.nii.gz"):
        read_volume(str(path))
