"""Read units of text files cut by byte ranges, in one streaming pass on the driver,
without parsing a file whole: a JSON array's elements (``_JsonScanner``, which finds where
each top-level element ends) and CSV rows (quoted newlines kept inside their row). A worker
then reads only its unit's bytes."""

from __future__ import annotations

import io
import json
import re

import pyarrow as pa

from pipeline.core.config import DataError
from pipeline.core.redaction import redact_text
from pipeline.core.storage import is_uri, open_input

UTF8_BOM = b"\xef\xbb\xbf"
NUMBER_CHARS = frozenset("0123456789+-.eE")
CR_LINE = re.compile(rb"(?<=\r)(?!\n)")  # after a lone \r: where a classic Mac OS line ends


class _JsonScanner:
    """Top-level values of a JSON file found by byte offset, one block at a time.

    The bytes are decoded as Latin-1, so a character offset is a byte offset: every byte of
    a UTF-8 multi-byte character is >= 0x80 and none is JSON syntax, so values end where
    they end in the UTF-8 text. The values themselves are parsed (to find their end) and
    dropped; only offsets are kept.
    """

    BLOCK = 1 << 23

    def __init__(self, f):
        self.f, self.buf, self.base, self.eof = f, "", 0, False
        self.lines = 0  # newlines before buf
        self.column = 0  # the column of buf[0]
        self.decoder = json.JSONDecoder()

    def _fill(self) -> None:
        data = self.f.read(self.BLOCK)
        self.eof = not data
        self.buf += data.decode("latin-1")

    def trim(self, pos: int) -> int:
        """Forget the text before ``pos`` (returns the new position)."""
        self.base += pos
        self.lines += self.buf.count("\n", 0, pos)
        last = self.buf.rfind("\n", 0, pos)
        self.column = pos - last - 1 if last >= 0 else self.column + pos
        self.buf = self.buf[pos:]
        return 0

    def start(self) -> int:
        """The position of the first value (after whitespace and a UTF-8 byte-order mark)."""
        pos = self.skip_ws(0)
        return self.skip_ws(len(UTF8_BOM)) if self.buf.startswith(UTF8_BOM.decode("latin-1")) else pos

    def skip_ws(self, pos: int) -> int:
        while True:
            while pos < len(self.buf) and self.buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(self.buf) or self.eof:
                return pos
            self._fill()

    def char(self, pos: int) -> str:
        pos = self.skip_ws(pos)
        return self.buf[pos] if pos < len(self.buf) else ""

    def value_end(self, pos: int) -> int:
        """The end of the JSON value at ``pos`` (JSONDecodeError if it is not one)."""
        while True:
            try:
                _, end = self.decoder.raw_decode(self.buf, pos)
                if self.eof or (end < len(self.buf) and self.buf[end] not in NUMBER_CHARS):
                    return end  # else a number may go on in the next block
            except json.JSONDecodeError as e:  # truncated by the block's end, or bad JSON
                if self.eof or (e.pos < len(self.buf) - 8 and not e.msg.startswith("Unterminated string")):
                    raise
            self._fill()

    def where(self, pos: int) -> str:
        line = self.lines + self.buf.count("\n", 0, pos) + 1
        last = self.buf.rfind("\n", 0, pos)
        column = pos - last if last >= 0 else self.column + pos + 1
        return f"line {line}, column {column}, byte {self.base + pos}"


def _json_array_chunks(path: str, rows_per_task: int) -> list[dict] | None:
    """Read units of a JSON array (or ``{"key": [rows]}``) by byte offsets, in one pass that
    keeps at most a block and one element in memory; None if the file is JSON Lines."""
    with open_input(path) as f:
        sc = _JsonScanner(f)
        pos = sc.start()
        first = sc.buf[pos] if pos < len(sc.buf) else ""
        if first == "{":  # {"key": [rows]}, or JSON Lines
            try:
                pos = sc.skip_ws(pos + 1)
                if sc.char(pos) != '"':
                    return _not_an_array(path)
                pos = sc.skip_ws(sc.value_end(pos))
                if sc.buf[pos:pos + 1] != ":":
                    return _not_an_array(path)
                pos = sc.skip_ws(pos + 1)
                if sc.buf[pos:pos + 1] != "[":
                    return _not_an_array(path)
                chunks, pos = _array_units(sc, pos, rows_per_task)
                pos = sc.skip_ws(pos)
                if sc.buf[pos:pos + 1] != "}" or sc.skip_ws(pos + 1) < len(sc.buf):
                    return _not_an_array(path)
                return chunks
            except json.JSONDecodeError:
                return None  # not one JSON document: read as JSON Lines
        if first != "[":
            return _not_an_array(path)
        try:
            chunks, pos = _array_units(sc, pos, rows_per_task)
        except json.JSONDecodeError as e:
            raise DataError(f"data.train_files: {redact_text(path)} is not a valid JSON array: {e.msg} at "
                             f"{sc.where(e.pos)}") from None
        if sc.skip_ws(pos) < len(sc.buf):
            return None  # text after the array: JSON Lines of arrays
        return chunks


def _array_units(sc: _JsonScanner, pos: int, rows_per_task: int) -> tuple[list[dict], int]:
    """Units over the elements of the array opening at ``pos``; returns them and the
    position after its ``]``."""
    chunks, count, start, end = [], 0, None, None
    pos = sc.skip_ws(pos + 1)
    if sc.buf[pos:pos + 1] == "]":
        return [], pos + 1
    while True:
        if start is None:
            start = sc.base + pos
        try:
            end = sc.value_end(pos)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError(f"row {count}: {e.msg}", e.doc, e.pos) from None
        count += 1
        if count % rows_per_task == 0:
            chunks.append(dict(start=start, stop=sc.base + end, first_row=count - rows_per_task, rows=rows_per_task,
                               kind="json"))
            start = None
        pos = sc.skip_ws(end)
        sep = sc.buf[pos:pos + 1]
        if sep == "]":
            break
        if sep != ",":
            raise json.JSONDecodeError(f"expected ',' or ']' after row {count - 1}", sc.buf, pos)
        pos = sc.skip_ws(pos + 1)
        if pos > sc.BLOCK:
            pos = sc.trim(pos)
    if start is not None:
        chunks.append(dict(start=start, stop=sc.base + end, first_row=count - count % rows_per_task,
                           rows=count % rows_per_task, kind="json"))
    return chunks, pos + 1


def _not_an_array(path: str) -> None:
    """A file that is not ``[rows]`` / ``{"key": [rows]}``: JSON Lines, unless it is one
    JSON value (then it is neither)."""
    with open_input(path) as f:
        sc = _JsonScanner(f)
        try:
            end = sc.value_end(sc.start())
        except json.JSONDecodeError:
            return None
        if sc.skip_ws(end) < len(sc.buf):
            return None
    raise DataError(f"data.train_files: {redact_text(path)} holds neither a JSON array of rows nor JSON Lines")


def _csv_lines(raw):
    """(line bytes) of a binary CSV stream, each with its line end: \n, \r\n or a lone \r."""
    for line in raw:
        if b"\r" in line[:-2] or line.endswith(b"\r"):
            yield from (piece for piece in CR_LINE.split(line) if piece)
        else:
            yield line


def _csv_chunks(path: str, rows_per_task: int) -> list[dict]:
    """Read units of a CSV file by byte offsets, in one streaming pass (a quoted value may
    hold newlines, so records are found by a CSV reader, not by lines); each unit carries
    the header's byte range, which its reader puts before the unit's bytes."""
    import csv

    csv.field_size_limit(2**31 - 1)
    pos = 0
    with open_input(path) as f:
        raw = io.BufferedReader(f) if is_uri(path) else f

        def lines():
            nonlocal pos
            for line in _csv_lines(raw):
                pos += len(line)
                yield line.decode("utf-8", errors="replace")

        reader = csv.reader(lines())
        try:
            head_start = 0
            for names in reader:
                if names:  # blank lines before the header are not the header (pyarrow skips them)
                    break
                head_start = pos
            else:
                return []
            header = [head_start, pos]
            chunks, count, start = [], 0, pos
            for record in reader:
                if not record:
                    continue  # a blank line is not a row (pyarrow skips it too)
                count += 1
                if count % rows_per_task == 0:
                    chunks.append(dict(start=start, stop=pos, first_row=count - rows_per_task, rows=rows_per_task,
                                       kind="csv", header=header))
                    start = pos
        except csv.Error as e:
            raise DataError(f"data.train_files: {redact_text(path)}: not CSV at record {reader.line_num}: {e}") from None
    if count % rows_per_task:
        chunks.append(dict(start=start, stop=pos, first_row=count - count % rows_per_task, rows=count % rows_per_task,
                           kind="csv", header=header))
    return chunks


def _read_csv_unit(chunk: dict) -> pa.Table:
    """A unit's records, every column as text (a prompt of "42" stays a string)."""
    import csv

    import pyarrow.csv as pacsv

    (head_start, head_stop), start, stop = chunk["header"], chunk["start"], chunk["stop"]
    with open_input(chunk["path"]) as f:
        f.seek(head_start)
        head = f.read(head_stop - head_start)
        f.seek(start)
        body = f.read(stop - start)
    names = next(csv.reader(io.StringIO(head.decode("utf-8-sig"), newline="")), [])
    return pacsv.read_csv(pa.BufferReader(head + body),
                          parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                               strings_can_be_null=False))
