"""Run-directory storage through pyarrow filesystems: a local path, or a URI
(``s3://``, ``gs://``, ``hdfs://``, ``file://``) that every stage reads and writes the same way.

``Loc`` is a small path object over ``pyarrow.fs``: the stages use it for every file of
the run directory (shards, manifests, metrics, checkpoints, the export, the report).

Commit semantics differ by kind, and a ``file://`` URI takes the object-store branch on
purpose, so that branch is exercised without a cloud account:

* a plain local path is written to a temporary name and renamed into place, so a reader
  never sees half a file;
* a URI is written straight to its final name (an object-store PUT is all-or-nothing, and
  object stores have no rename); there the stage manifest, written last, is the only commit
  marker, and the readers check each shard's footer and row count.

Libraries that only write local files (DeepSpeed checkpoints, TensorBoard, ``save_pretrained``,
matplotlib) write to a local staging directory that is then uploaded with ``upload``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def open_input(path: str):
    """A binary file object for a local path or a pyarrow-filesystem URI (s3://, gs://,
    hdfs://, file://), as pyarrow opens them."""
    if is_uri(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return filesystem.open_input_file(inner)
    return open(path, "rb")


class Loc:
    """A file or directory on a pyarrow filesystem, addressed like a ``pathlib.Path``."""

    __slots__ = ("fs", "path", "scheme", "remote")

    def __init__(self, location: "str | os.PathLike | Loc", *, _parts=None):
        if _parts is not None:
            self.fs, self.path, self.scheme, self.remote = _parts
            return
        if isinstance(location, Loc):
            self.fs, self.path, self.scheme, self.remote = location.fs, location.path, location.scheme, location.remote
            return
        text = str(location)
        if is_uri(text):
            self.fs, self.path = pafs.FileSystem.from_uri(text)
            self.scheme = text.split("://", 1)[0] + "://"
            self.remote = True
        else:
            self.fs = pafs.LocalFileSystem()
            self.path = str(Path(text).expanduser().resolve())
            self.scheme = ""
            self.remote = False
        self.path = self.path.rstrip("/") or "/"

    # ------------------------------------------------------------------ naming

    def _with_path(self, path: str) -> "Loc":
        return Loc(None, _parts=(self.fs, path, self.scheme, self.remote))

    def __truediv__(self, name: str) -> "Loc":
        return self._with_path(str(PurePosixPath(self.path) / str(name)))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> "Loc":
        return self._with_path(str(PurePosixPath(self.path).parent))

    def relative_to(self, other: "Loc") -> str:
        return str(PurePosixPath(self.path).relative_to(other.path))

    def __str__(self) -> str:
        return f"{self.scheme}{self.path}" if self.remote else self.path

    def __repr__(self) -> str:
        return f"Loc({str(self)!r})"

    def __fspath__(self) -> str:
        if self.remote:
            raise TypeError(f"{self} is a URI, not a local path")
        return self.path

    def __eq__(self, other) -> bool:
        return isinstance(other, Loc) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "Loc") -> bool:
        return str(self) < str(other)

    @property
    def local(self) -> Path | None:
        """The local path, for a plain local location; None for a URI."""
        return None if self.remote else Path(self.path)

    # ------------------------------------------------------------------ queries

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int | None:
        info = self.info()
        return info.size if info.type == pafs.FileType.File else None

    def iterdir(self) -> list["Loc"]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((self._with_path(i.path.rstrip("/")) for i in infos), key=str)

    def glob(self, pattern: str) -> list["Loc"]:
        """Children whose name matches ``pattern`` (one level, like ``Path.glob("x-*")``)."""
        return [c for c in self.iterdir() if fnmatch.fnmatchcase(c.name, pattern)]

    def files(self) -> list["Loc"]:
        """Every file below this directory, sorted."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return sorted((self._with_path(i.path) for i in infos if i.type == pafs.FileType.File), key=str)

    # ------------------------------------------------------------------ reading

    def open_input(self):
        """A random-access file (what ``pyarrow.parquet.ParquetFile`` reads)."""
        return self.fs.open_input_file(self.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    # ------------------------------------------------------------------ writing

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def rmtree(self) -> None:
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def unlink(self) -> None:
        if self.is_file():
            self.fs.delete_file(self.path)

    def _tmp(self) -> "Loc":
        return self.parent / f".{self.name}.tmp-{os.getpid()}"

    def write_with(self, writer) -> None:
        """``writer(sink_loc)`` writes the file; a local path is committed by rename."""
        self.parent.mkdir()
        if self.remote:
            writer(self)
            return
        tmp = self._tmp()
        writer(tmp)
        self.fs.move(tmp.path, self.path)

    def write_bytes(self, data: bytes) -> None:
        def put(loc: Loc) -> None:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)

        self.write_with(put)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_parquet(self, table, **kwargs) -> None:
        import pyarrow.parquet as pq

        self.write_with(lambda loc: pq.write_table(table, loc.path, filesystem=loc.fs, **kwargs))

    # ------------------------------------------------------------------ local staging

    def upload(self, local: Path) -> None:
        """Copy a local file or directory tree to this location (files overwrite); a tree's
        files ``COPY_THREADS`` at a time. A file that must arrive last (a marker) is written
        after the tree."""
        local = Path(local)
        if local.is_dir():
            self.mkdir()
            files = sorted(p for p in local.rglob("*") if p.is_file())
            _side_by_side(files, lambda f: (self / str(f.relative_to(local))).upload(f))
            return
        if not self.remote and Path(self.path).resolve() == local.resolve():
            return
        self.write_with(lambda loc: pafs.copy_files(str(local), loc.path, source_filesystem=pafs.LocalFileSystem(),
                                                    destination_filesystem=loc.fs))

    def download(self, local: Path) -> None:
        """Copy this file or directory tree to a local path; a tree's files ``COPY_THREADS``
        at a time."""
        local = Path(local)
        if self.is_dir():
            _side_by_side(self.files(), lambda f: f.download(local / f.relative_to(self)))
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        pafs.copy_files(self.path, str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local)


# Files of a tree copied side by side: one stream to or from a bucket moves a few hundred
# MB/s, a node's link several GB/s (bench/storage_copy.py measures the two).
COPY_THREADS = 8


def _side_by_side(items: list, copy) -> None:
    """``copy`` each item, ``COPY_THREADS`` at a time; the first error is raised."""
    if len(items) <= 1 or COPY_THREADS <= 1:
        for item in items:
            copy(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(COPY_THREADS, len(items))) as pool:
        list(pool.map(copy, items))


def scratch_root(local_dir: str | None, out: Loc) -> Path:
    """This node's working directory for the output ``out`` in a bucket: under ``local_dir``
    (a training stage's setting: a local disk) or the system's temp directory, one folder
    per output, shared by the processes of the node."""
    import tempfile

    root = Path(local_dir or tempfile.gettempdir()) / "dpo-pipeline"
    return root / hashlib.sha256(str(out).encode()).hexdigest()[:16]
