"""A directory tree to and from a bucket, its files side by side (pipeline/core/storage.py,
``COPY_THREADS``): every file arrives whole, under its own path, and a failed file fails
the copy."""

import pytest

from pipeline.core import storage
from pipeline.core.storage import Loc


def tree(root, files: int = 20):
    for i in range(files):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i:02d}.bin").write_bytes(bytes([i]) * (1000 + i))
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.bin")}


def test_a_tree_goes_up_and_comes_back_whole(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "COPY_THREADS", 8)
    want = tree(tmp_path / "src")
    remote = Loc(f"{s3_bucket}/copy-{tmp_path.name}")
    remote.upload(tmp_path / "src")
    assert sorted(f.relative_to(remote) for f in remote.files()) == sorted(want)
    remote.download(tmp_path / "back")
    assert {str(p.relative_to(tmp_path / "back")): p.read_bytes() for p in (tmp_path / "back").rglob("*.bin")} == want


def test_a_file_that_fails_fails_the_copy(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "COPY_THREADS", 8)
    tree(tmp_path / "src")
    real = Loc.upload

    def upload(self, local):
        if str(local).endswith("f07.bin"):
            raise OSError("the bucket refused f07.bin")
        return real(self, local)

    monkeypatch.setattr(Loc, "upload", upload)
    with pytest.raises(OSError, match="refused f07.bin"):
        Loc(f"{s3_bucket}/copy-fail-{tmp_path.name}").upload(tmp_path / "src")
