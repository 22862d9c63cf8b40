"""Big single-file inputs are cut into read units that are read without parsing the rest
of the file: JSON arrays and CSV by byte ranges, a Parquet file of one huge row group
rewritten (streamed) into row groups of ``rows_per_task`` rows."""

import json
import random

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.core import text_units
from pipeline.core.sources import Source, plan_chunks, read_chunk
from pipeline.core.storage import Loc

TEXTS = ["plain", "é ü 漢字 😀", 'a "quote" and a \\ backslash', "comma, here", "two\nlines", "", "42",
         "  spaced  ", "tab\there", "crlf\r\ninside"]


def rows(n, seed=0):
    rng = random.Random(seed)
    return [{key: rng.choice(TEXTS) + str(i) for key in ("prompt", "chosen", "rejected")} for i in range(n)]


def write(tmp_path, kind, data):
    if kind == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == "json_wrapped":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"rows": data}, ensure_ascii=False), encoding="utf-8")
    elif kind == "csv":
        path = tmp_path / "d.csv"
        pacsv.write_csv(pa.Table.from_pylist(data), path)
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(data), path, row_group_size=len(data))  # one row group
    return path


KINDS = {"json_array": "json", "json_wrapped": "json", "csv": "csv", "parquet_one_group": "parquet"}


@pytest.mark.parametrize("block", [7, 1 << 23])  # 7 bytes: every value crosses a block boundary
@pytest.mark.parametrize("kind", list(KINDS))
def test_units_hold_every_row_once_in_order(tmp_path, monkeypatch, kind, block):
    monkeypatch.setattr(text_units._JsonScanner, "BLOCK", block)
    data = rows(50)
    path = write(tmp_path, kind, data)
    for rows_per_task in (1, 3, 7, 50, 1000):
        staging = Loc(tmp_path / f"staging-{rows_per_task}")
        chunks = plan_chunks([Source("d", str(path), KINDS[kind])], rows_per_task, staging=staging)
        assert len(chunks) == -(-50 // rows_per_task)  # ceil: one unit per rows_per_task rows
        got = [(index, row) for chunk in chunks for index, row, _ in read_chunk(chunk)]
        assert [index for index, _ in got] == list(range(50))
        assert [row for _, row in got] == data


def corrupt_outside(path, keep: list[tuple[int, int]]):
    """Overwrite every byte outside the kept ranges with bytes that are not JSON or CSV."""
    data = bytearray(path.read_bytes())
    kept = bytearray(len(data))
    for start, stop in keep:
        kept[start:stop] = b"\x01" * (stop - start)
    path.write_bytes(bytes(b if k else 0x7B for b, k in zip(data, kept)))  # "{{{{..."


@pytest.mark.parametrize("kind", ["json_array", "csv"])
def test_a_unit_reads_only_its_own_bytes(tmp_path, kind):
    data = rows(30)
    path = write(tmp_path, kind, data)
    chunks = plan_chunks([Source("d", str(path), KINDS[kind])], 10)
    middle = chunks[1]
    keep = [(middle["start"], middle["stop"])] + ([tuple(middle["header"])] if kind == "csv" else [])
    corrupt_outside(path, keep)
    got = read_chunk(middle)
    assert [index for index, _, _ in got] == list(range(10, 20))
    assert [row for _, row, _ in got] == data[10:20]


def test_a_bad_json_array_names_the_row_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a", "chosen": b"}\n]')
    with pytest.raises(ValueError, match=r"d\.json is not a valid JSON array: row 1: Expecting value at line 3, "
                                         r"column 28, byte 79$"):
        plan_chunks([Source("d", str(path), "json")], 10)
    path.write_text('[{"prompt": "a"} {"prompt": "b"}]')
    with pytest.raises(ValueError, match=r"expected ',' or '\]' after row 0 at line 1, column 18"):
        plan_chunks([Source("d", str(path), "json")], 10)


@pytest.mark.parametrize("block", range(1, 14))
def test_a_number_cut_at_a_block_end_is_read_whole(tmp_path, monkeypatch, block):
    monkeypatch.setattr(text_units._JsonScanner, "BLOCK", block)
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}, 1.5, 12e5, -3]')
    got = [(index, row) for chunk in plan_chunks([Source("d", str(path), "json")], 1) for index, row, _ in
           read_chunk(chunk)]
    assert got == [(0, {"a": 1}), (1, None), (2, None), (3, None)]  # numbers are not rows: quarantined


def test_csv_with_blank_lines_before_the_header_and_classic_mac_line_ends(tmp_path):
    import csv

    data = [{k: v.replace("\r", "") for k, v in r.items()} for r in rows(7)]
    for name, lead, end in (("blank.csv", "\n\n", "\n"), ("mac.csv", "", "\r")):
        path = tmp_path / name
        with open(path, "w", newline="", encoding="utf-8") as f:
            f.write(lead)
            writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"], lineterminator=end,
                                    quoting=csv.QUOTE_ALL)  # csv quotes a value with \n only when it ends lines
            writer.writeheader()
            writer.writerows(data)
        chunks = plan_chunks([Source("d", str(path), "csv")], 2)
        assert [(index, row) for chunk in chunks for index, row, _ in read_chunk(chunk)] == list(enumerate(data))


def test_json_lines_named_json_and_a_lone_object(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": ["a"], "chosen": "b", "rejected": "c"}\nnot json\n')  # a list in the first key
    got = [(index, row, text) for chunk in plan_chunks([Source("d", str(path), "json")], 10) for index, row, text
           in read_chunk(chunk)]
    assert got == [(0, {"prompt": ["a"], "chosen": "b", "rejected": "c"},
                    '{"prompt": ["a"], "chosen": "b", "rejected": "c"}'), (1, None, "not json")]
    path.write_text('{"a": [1], "b": 2}')
    with pytest.raises(ValueError, match="neither a JSON array of rows nor JSON Lines"):
        plan_chunks([Source("d", str(path), "json")], 10)


def test_one_row_group_parquet_runs_as_many_units_and_the_copy_is_removed(assets, tmp_path):
    from helpers import tiny_config
    from pipeline.core.config import config_from_dict, to_dict
    from pipeline.tokenizing import tokenize
    from pipeline.tokenizing.chunk import TokenizeChunk, UNITS_DIR
    from pipeline.tokenizing.pack import write_groups_local

    data = [{"prompt": f"Describe item {i}.", "chosen": " It is great.", "rejected": " It is awful."}
            for i in range(40)]
    path = write(tmp_path, "parquet_one_group", data)
    raw = to_dict(tiny_config(assets, tmp_path / "run", tokenize={"rows_per_task": 7}, data={"eval_fraction": 0.2}))
    raw["data"]["train_files"] = [str(path)]
    cfg = config_from_dict(raw)
    seen = []

    def tokenize_units(chunks, units_dir):
        seen.extend(chunks)
        worker = TokenizeChunk(to_dict(cfg), str(units_dir))
        return [worker.tokenize_unit(chunk) for chunk in chunks]

    out = Loc(tmp_path / "out")
    _, stats = tokenize.tokenize_all(cfg, out, tokenize_units, write_groups_local)
    assert len(seen) == 6 and {c["path"] for c in seen} != {str(path)}  # read from the rewritten copy
    assert [c["first_row"] for c in seen] == [0, 7, 14, 21, 28, 35] and {c["label"] for c in seen} == {str(path)}
    assert stats["train"]["pairs"] + stats["eval"]["pairs"] == 40
    assert not (out / UNITS_DIR).exists()


@pytest.mark.parametrize("kind", ["json_array", "jsonl", "csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, kind):
    data = rows(5)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    else:
        path = write(tmp_path, kind, data)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows tools save UTF-8
    chunks = plan_chunks([Source("d", str(path), {"json_array": "json"}.get(kind, kind))], 2)
    assert [row for chunk in chunks for _, row, _ in read_chunk(chunk)] == data
