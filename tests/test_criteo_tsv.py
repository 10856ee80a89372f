"""Criteo TSV reader: every irregularity of the raw files, against a plain per-line reference parser."""

from __future__ import annotations

import gzip
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bagpipe.data.criteo_tsv import (
    MISSING_ROW,
    RARE_ROW,
    BadLinesWarning,
    CriteoTSV,
    ModuloHashing,
    Vocabulary,
    list_input_files,
)

SIZES = [7 + 3 * j for j in range(26)]  # small tables, different per feature


# ---------------------------------------------------------------------------------------------- helpers
def random_lines(rng: np.random.Generator, n: int, labeled: bool = True, strip: float = 0.0) -> list[str]:
    """Criteo-like lines: missing values, negative dense values, hashes over 2**31. With ``strip`` > 0 that
    share of lines lose their trailing empty fields, which makes them malformed (short)."""
    lines = []
    for _ in range(n):
        fields = [str(int(rng.integers(0, 2)))] if labeled else []
        for _ in range(13):
            r = rng.random()
            fields.append(
                ""
                if r < 0.2
                else str(int(rng.integers(-3, 0)))
                if r < 0.3
                else str(int(rng.integers(0, 10**6)))
            )
        for _ in range(26):
            r = rng.random()
            h = int(rng.integers(0, 2**32))
            fields.append("" if r < 0.15 else (f"{h:08x}" if r < 0.9 else f"{h:08X}"))
        if rng.random() < strip:  # a tool stripped the trailing empty fields (the tabs)
            while fields and fields[-1] == "":
                fields.pop()
        lines.append("\t".join(fields))
    return lines


def reference(
    lines: list[str], labeled: bool, sizes: list[int]
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Plain per-line parse of well-formed lines: labels, dense [n, 13], rows [n, 26] with modulo hashing."""
    expected = 40 if labeled else 39
    labels, dense, rows = [], [], []
    for line in lines:
        f = line.rstrip("\r").split("\t")
        assert len(f) == expected, f"reference() takes well-formed lines only, got {len(f)} fields"
        if labeled:
            labels.append(float(int(f[0])))
            f = f[1:]
        dense.append([np.float32(math.log1p(max(int(v), 0))) if v else np.float32(0.0) for v in f[:13]])
        rows.append([1 + int(v, 16) % (n - 1) if v else 0 for v, n in zip(f[13:], sizes)])
    lab = np.array(labels, dtype=np.float32) if labeled else None
    return (
        lab,
        np.array(dense, dtype=np.float32).reshape(-1, 13),
        np.array(rows, dtype=np.int64).reshape(-1, 26),
    )


def collect(reader) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Concatenate a reader's batches back into labels, dense and a [n, 26] row matrix."""
    labels, dense, rows = [], [], []
    for b in reader:
        assert b.sparse.keys == reader.tables.names and b.sparse.is_one_hot()
        assert b.sparse.values.dtype == torch.int64
        labels.append(None if b.labels is None else b.labels.numpy())
        dense.append(b.dense.numpy())
        rows.append(b.sparse.values.view(26, -1).t().numpy())
    lab = None if labels[0] is None else np.concatenate(labels)
    return lab, np.concatenate(dense), np.concatenate(rows)


def write(
    path: Path, lines: list[str], gz: bool = False, newline: str = "\n", final_newline: bool = True
) -> Path:
    data = (newline.join(lines) + (newline if final_newline else "")).encode()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def assert_matches(reader, lines, labeled=True, sizes=SIZES):
    lab, dense, rows = collect(reader)
    rlab, rdense, rrows = reference(lines, labeled, sizes)
    if labeled:
        np.testing.assert_array_equal(lab, rlab)
    else:
        assert lab is None
    np.testing.assert_array_equal(dense, rdense)
    np.testing.assert_array_equal(rows, rrows)


# ---------------------------------------------------------------------------------------------- format
def test_regular_file_matches_reference(tmp_path):
    lines = random_lines(np.random.default_rng(0), 500)
    path = write(tmp_path / "day_0", lines)
    reader = CriteoTSV(path, 64, hashing=ModuloHashing(SIZES))
    assert_matches(reader, lines)
    assert reader.stats.lines == reader.stats.rows == 500 and reader.skipped_lines == 0
    sizes = [b.batch_size for b in reader]
    assert sizes == [64] * 7 + [500 - 7 * 64]  # the last partial batch is kept
    assert [b.batch_size for b in CriteoTSV(path, 64, hashing=ModuloHashing(SIZES), drop_last=True)] == [
        64
    ] * 7


def test_hashes_above_two_to_the_31_stay_exact(tmp_path):
    # 0xffffffff and 0x80000000 overflow int32; with sizes 2**40 the row is 1 + hash exactly.
    big = [0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0xDEADBEEF]
    lines = ["1" + "\t" * 14 + "\t".join(f"{big[j % 4]:08x}" for j in range(26))]
    reader = CriteoTSV(write(tmp_path / "t.tsv", lines), 1, hashing=ModuloHashing(2**40))
    batch = next(iter(reader))
    assert batch.labels.tolist() == [1.0]  # detected as labeled: 40 fields
    values = batch.sparse.values
    assert values.dtype == torch.int64
    assert values.tolist() == [1 + big[j % 4] for j in range(26)]


def test_missing_values_and_negative_dense(tmp_path):
    line = "0\t-5\t\t3\t-1\t0" + "\t" * 8 + "\t" + "\t".join([""] * 25 + ["a"])
    path = write(tmp_path / "t.tsv", [line])
    reader = CriteoTSV(path, 1, hashing=ModuloHashing(SIZES))
    b = next(iter(reader))
    expected_dense = [0.0, 0.0, math.log1p(3), 0.0, 0.0] + [0.0] * 8
    np.testing.assert_array_equal(b.dense.numpy()[0], np.array(expected_dense, dtype=np.float32))
    rows = b.sparse.values.tolist()
    assert rows[:25] == [MISSING_ROW] * 25 and rows[25] == 1 + 10 % (SIZES[25] - 1)
    assert reader.stats.negative_dense == 2  # -5 and -1 ("-0" would not count)


def without_field(line: str, index: int) -> str:
    """``line`` with its field ``index`` (0-based, the label is 0) deleted: the rest shift left."""
    fields = line.split("\t")
    del fields[index]
    return "\t".join(fields)


def test_short_lines_are_bad_lines_not_padded(tmp_path):
    # A middle column deleted (C7, field 20 of 0..39) leaves 39 fields, as many as an unlabeled line has,
    # but the file's format comes from its longest lines (40: labeled), so the line is reported instead of
    # having C8..C26 read as C7..C25.
    full = "1\t5\t6" + "\t" * 12 + "\t".join(f"{j + 1:08x}" for j in range(26))
    no_c7 = without_field(full, 20)
    stripped = "0\t7"  # everything after I1 stripped
    path = write(tmp_path / "day_0.tsv", [full, full, no_c7, full, stripped, full])
    with pytest.raises(ValueError) as err:
        list(CriteoTSV(path, 8, hashing=ModuloHashing(SIZES)))
    assert "day_0.tsv, line 3: 39 tab-separated fields, expected 40 (label, I1..I13, C1..C26)" in str(
        err.value
    )
    assert "skip_bad_lines=True" in str(err.value)
    # Skipping is on request only, and counted: the short lines are dropped, never padded.
    reader = CriteoTSV(path, 8, hashing=ModuloHashing(SIZES), skip_bad_lines=True)
    with pytest.warns(
        BadLinesWarning,
        match=r"skipped 2 malformed line\(s\) of 6 read \(first: .*day_0\.tsv:3, .*day_0\.tsv:5\)",
    ):
        got = collect(reader)
    assert (
        reader.skipped_lines == 2
        and reader.stats.rows == 4
        and reader.stats.skipped_examples[1].endswith(":5")
    )
    for a, b in zip(got, reference([full] * 4, True, SIZES)):
        np.testing.assert_array_equal(a, b)
    # The same in an unlabeled file: 38 fields where 39 are expected.
    unlabeled = full.split("\t", 1)[1]
    path = write(tmp_path / "test.txt", [unlabeled, without_field(unlabeled, 5), unlabeled])
    with pytest.raises(
        ValueError, match=r"test\.txt, line 2: 38 tab-separated fields, expected 39 \(I1\.\.I13, C1"
    ):
        list(CriteoTSV(path, 8, hashing=ModuloHashing(SIZES)))


def test_unlabeled_test_files(tmp_path):
    lines = random_lines(np.random.default_rng(1), 50, labeled=False, strip=0.0)
    path = write(tmp_path / "test.txt", lines)
    detected = CriteoTSV(path, 16, hashing=ModuloHashing(SIZES))
    assert all(b.labels is None for b in detected)
    assert_matches(detected, lines, labeled=False)
    assert_matches(CriteoTSV(path, 16, hashing=ModuloHashing(SIZES), labeled=False), lines, labeled=False)
    # Told it is labeled, every line lacks a field.
    bad = CriteoTSV(path, 16, hashing=ModuloHashing(SIZES), labeled=True)
    with pytest.raises(ValueError, match=r"test\.txt, line 1: 39 tab-separated fields, expected 40"):
        list(bad)


def test_format_detection_needs_a_full_line(tmp_path):
    path = write(tmp_path / "t.tsv", ["1\t2\t3"])
    with pytest.raises(ValueError, match="pass labeled=True or labeled=False"):
        list(CriteoTSV(path, 4))
    # Told the format, the line is checked and reported like any short line.
    with pytest.raises(ValueError, match=r"t\.tsv, line 1: 3 tab-separated fields, expected 40"):
        list(CriteoTSV(path, 4, labeled=True))


def test_comma_separated_files_are_named_as_such(tmp_path):
    path = write(tmp_path / "t.csv", ["1,2,3", "0,5,6"])
    with pytest.raises(ValueError, match=r"1 tab-separated field\(s\) and holds commas: Criteo fields"):
        list(CriteoTSV(path, 4))
    with pytest.raises(ValueError, match=r"line 1: 1 tab-separated fields.*the line holds 2 commas"):
        list(CriteoTSV(path, 4, labeled=True))
    with pytest.raises(ValueError, match=r"has 3 tab-separated field\(s\); pass labeled="):  # no commas
        list(CriteoTSV(write(tmp_path / "t.tsv", ["1\t2\t3"]), 4))


def test_labeled_and_unlabeled_files_do_not_mix(tmp_path):
    rng = np.random.default_rng(2)
    write(tmp_path / "a.tsv", random_lines(rng, 5, strip=0.0))
    write(tmp_path / "b.tsv", random_lines(rng, 5, labeled=False, strip=0.0))
    with pytest.raises(ValueError, match=r"b\.tsv looks unlabeled"):
        list(CriteoTSV(tmp_path, 4))


def test_gzip_and_crlf_give_the_same_batches(tmp_path):
    lines = random_lines(np.random.default_rng(3), 300)
    plain = CriteoTSV(write(tmp_path / "p.tsv", lines), 50, hashing=ModuloHashing(SIZES))
    gz = CriteoTSV(write(tmp_path / "g.tsv.gz", lines, gz=True), 50, hashing=ModuloHashing(SIZES))
    crlf = CriteoTSV(write(tmp_path / "c.tsv", lines, newline="\r\n"), 50, hashing=ModuloHashing(SIZES))
    no_end = CriteoTSV(
        write(tmp_path / "n.tsv", lines, final_newline=False), 50, hashing=ModuloHashing(SIZES)
    )
    ref = collect(plain)
    for other in (gz, crlf, no_end):
        got = collect(other)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)


def test_folder_in_natural_order_with_batches_across_files(tmp_path):
    rng = np.random.default_rng(4)
    parts = {name: random_lines(rng, 30) for name in ["day_10", "day_2", "day_1"]}
    for name, lines in parts.items():
        write(tmp_path / name, lines, gz=name == "day_2")
    (tmp_path / ".hidden").write_text("garbage\n")
    files = list_input_files(tmp_path)
    assert [f.name for f in files] == ["day_1", "day_2", "day_10"]
    reader = CriteoTSV(tmp_path, 40, hashing=ModuloHashing(SIZES))
    assert [b.batch_size for b in reader] == [40, 40, 10]
    assert_matches(reader, parts["day_1"] + parts["day_2"] + parts["day_10"])


def test_iterating_twice_gives_the_same_batches(tmp_path):
    path = write(tmp_path / "t.tsv", random_lines(np.random.default_rng(5), 100))
    reader = CriteoTSV(path, 30, hashing=ModuloHashing(SIZES))
    a, b = collect(reader), collect(reader)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CriteoTSV(tmp_path / "nope", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        CriteoTSV(tmp_path / "empty", 4)


# ---------------------------------------------------------------------------------------------- bad lines
GOOD = "1\t1\t2" + "\t" * 12 + "\t".join(["1a2b3c4d"] * 26)
BAD_LINES = [
    (GOOD + "\textra", "41 tab-separated fields, expected 40"),
    ("", "empty line"),
    ("2" + GOOD[1:], "label '2' is not 0 or 1"),
    ("x" + GOOD[1:], "label 'x' is not 0 or 1"),
    (GOOD.replace("1\t1\t2", "1\t1.5\t2", 1), "dense feature I1 value '1.5' is not an integer"),
    (GOOD.replace("1\t1\t2", "1\t1\t-", 1), "dense feature I2 value '-' is not an integer"),
    (GOOD.replace("1a2b3c4d", "xyz", 1), "categorical feature C1 value 'xyz' is not a hexadecimal hash"),
    (GOOD.replace("1a2b3c4d", "1" * 16, 1), "categorical feature C1 value '1111111111111111'"),
    (without_field(GOOD, 20), "39 tab-separated fields, expected 40"),  # C7 deleted
    ("1\t1\t2", "3 tab-separated fields, expected 40"),  # trailing fields stripped
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, bad, reason):
    lines = [GOOD] * 6 + [bad] + [GOOD] * 3
    path = write(tmp_path / "day_3.tsv", lines)
    # A tiny block size puts the bad line in a later block: line numbers must still be right.
    for chunk in (1 << 20, 100):
        reader = CriteoTSV(path, 4, hashing=ModuloHashing(SIZES), labeled=True, chunk_bytes=chunk)
        with pytest.raises(ValueError) as err:
            list(reader)
        assert f"day_3.tsv, line 7: {reason}" in str(err.value)


def test_skip_bad_lines_counts_and_warns(tmp_path):
    good = random_lines(np.random.default_rng(6), 20, strip=0.0)
    lines = good[:5] + [b for b, _ in BAD_LINES[:3]] + good[5:] + [BAD_LINES[6][0]]
    path = write(tmp_path / "t.tsv", lines)
    reader = CriteoTSV(
        path, 7, hashing=ModuloHashing(SIZES), labeled=True, skip_bad_lines=True, chunk_bytes=300
    )
    with pytest.warns(BadLinesWarning, match=r"skipped 4 malformed line\(s\) of 24 read \(first: .*t\.tsv:6"):
        got = collect(reader)
    assert reader.skipped_lines == 4 and reader.stats.rows == 20
    ref = reference(good, True, SIZES)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    # No bad lines, no warning.
    clean = CriteoTSV(write(tmp_path / "ok.tsv", good), 7, hashing=ModuloHashing(SIZES), skip_bad_lines=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(clean)


def test_a_pass_stopped_early_still_reports_its_skipped_lines(tmp_path):
    # A consumer that needs only the first batches (trace --batches N, training with max_steps) closes
    # the pass before its end: the lines it skipped must still be reported, when it stops.
    good = random_lines(np.random.default_rng(8), 30, strip=0.0)
    path = write(tmp_path / "t.tsv", [*good[:2], BAD_LINES[0][0], *good[2:]])
    reader = CriteoTSV(path, 4, hashing=ModuloHashing(SIZES), labeled=True, skip_bad_lines=True)
    batches = iter(reader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while the pass runs
        first = next(batches)
    assert first.batch_size == 4 and reader.skipped_lines == 1
    with pytest.warns(
        BadLinesWarning, match=r"skipped 1 malformed line\(s\) of 31 read \(first: .*t\.tsv:3\)"
    ):
        batches.close()
    # Stopped early without skipping anything: no warning.
    clean = CriteoTSV(write(tmp_path / "ok.tsv", good), 4, hashing=ModuloHashing(SIZES), skip_bad_lines=True)
    batches = iter(clean)
    next(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches.close()


def test_skipped_lines_with_non_digit_dense_values_raise_no_numpy_warning(tmp_path):
    # A dropped line's dense fields are never transformed: no "invalid value encountered in log1p".
    good = random_lines(np.random.default_rng(4), 10, strip=0.0)
    bad = GOOD.replace("1\t1\t2", "1\tabc\tx9", 1)
    path = write(tmp_path / "t.tsv", [*good[:4], bad, *good[4:]])
    reader = CriteoTSV(path, 8, hashing=ModuloHashing(SIZES), labeled=True, skip_bad_lines=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = collect(reader)
    assert [w.category for w in caught] == [BadLinesWarning]
    for a, b in zip(got, reference(good, True, SIZES)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- hashing
def test_modulo_hashing_checks_sizes():
    with pytest.raises(ValueError, match="C3 needs at least 2 rows"):
        ModuloHashing([5, 5, 1] + [5] * 23)
    with pytest.raises(ValueError, match="one table size or 26"):
        ModuloHashing([5, 5])
    assert ModuloHashing(100).tables.sizes.tolist() == [100] * 26


def test_modulo_hashing_takes_numpy_integers_and_refuses_other_numbers():
    # numpy integers are integers: one for every table, or one per table
    assert ModuloHashing(np.int64(1000)).tables.sizes.tolist() == [1000] * 26
    assert ModuloHashing(np.asarray(SIZES, dtype=np.int32)).tables.sizes.tolist() == SIZES
    assert ModuloHashing([np.uint16(s) for s in SIZES]).tables.sizes.tolist() == SIZES
    # anything else is refused, naming the value, rather than truncated
    with pytest.raises(ValueError, match=r"table C1: size 1000\.7 \(float\) is not an integer"):
        ModuloHashing([1000.7] * 26)
    with pytest.raises(ValueError, match=r"table C2: size 5\.0 \(float\)"):
        ModuloHashing([5, 5.0] + [5] * 24)
    with pytest.raises(ValueError, match=r"table sizes must be an integer or 26 integers, got 1000\.7"):
        ModuloHashing(1000.7)
    with pytest.raises(ValueError, match=r"got True \(bool\)"):
        ModuloHashing(True)
    with pytest.raises(ValueError, match=r"got '1000' \(str\)"):
        ModuloHashing("1000")


def test_vocabulary_threshold_order_and_unseen_values(tmp_path):
    def line(c1: str, c2: str) -> str:
        return "0" + "\t" * 13 + "\t" + c1 + "\t" + c2 + "\t" * 24

    # C1: "a" x3, "b" x2, "c" x1, missing x1.  C2: "ff" x7.
    train = [line("a", "ff")] * 3 + [line("b", "ff")] * 2 + [line("c", "ff"), line("", "ff")]
    path = write(tmp_path / "train.tsv", train)
    vocab = Vocabulary.build(path, threshold=2)
    assert vocab.tables.sizes[0] == 2 + 2  # missing, rare, "a", "b"
    assert vocab.tables.sizes[1] == 3 and vocab.tables.sizes[2] == 2  # C3 never seen: missing + rare
    reader = CriteoTSV(path, 16, hashing=vocab)
    c1 = next(iter(reader)).sparse.values.view(26, -1)[0].tolist()
    # Most frequent first: "a" -> 2, "b" -> 3; "c" (seen once) -> rare; missing -> 0.
    assert c1 == [2, 2, 2, 3, 3, RARE_ROW, MISSING_ROW]
    # A value never seen in training maps to the rare row; the saved vocabulary behaves the same.
    vocab.save(tmp_path / "v.npz")
    loaded = Vocabulary.load(tmp_path / "v.npz")
    assert loaded.tables == vocab.tables and loaded.threshold == 2
    val = write(tmp_path / "val.tsv", [line("b", "ee"), line("d", "ff")])
    got = next(iter(CriteoTSV(val, 4, hashing=loaded))).sparse.values.view(26, -1)
    assert got[0].tolist() == [3, RARE_ROW] and got[1].tolist() == [RARE_ROW, 2]


def test_vocabulary_counts_across_many_blocks(tmp_path):
    rng = np.random.default_rng(7)
    hashes = rng.zipf(1.5, size=3000) % 500
    lines = ["1" + "\t" * 13 + "\t" + f"{h:x}" + "\t" * 25 for h in hashes]
    vocab = Vocabulary.build(write(tmp_path / "t.tsv", lines), threshold=3, chunk_bytes=256)
    values, counts = np.unique(hashes, return_counts=True)
    kept = values[counts >= 3]
    np.testing.assert_array_equal(vocab.keys[0], kept)
    # Rows follow decreasing counts, ties broken by the smaller hash.
    order = sorted(kept.tolist(), key=lambda v: (-int(counts[values == v][0]), v))
    assert [int(vocab.rows[0][vocab.keys[0] == v][0]) for v in order] == list(range(2, 2 + kept.size))


def test_vocabulary_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a lightning-bagpipe vocabulary"):
        Vocabulary.load(tmp_path / "x.npz")


# ---------------------------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 120),
    batch_size=st.integers(1, 50),
    chunk_bytes=st.sampled_from([64, 257, 4096, 1 << 20]),
    labeled=st.booleans(),
)
def test_any_block_size_and_batch_size_match_the_reference(seed, n, batch_size, chunk_bytes, labeled):
    lines = random_lines(np.random.default_rng(seed), n, labeled=labeled, strip=0.3)
    expected = 40 if labeled else 39
    good = [line for line in lines if line.count("\t") == expected - 1]
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "t.tsv", lines)
        reader = CriteoTSV(
            path,
            batch_size,
            hashing=ModuloHashing(SIZES),
            labeled=labeled,
            chunk_bytes=chunk_bytes,
            skip_bad_lines=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadLinesWarning)
            if good:
                assert_matches(reader, good, labeled=labeled)
            else:
                assert list(reader) == []
        assert reader.skipped_lines == len(lines) - len(good) and reader.stats.rows == len(good)


def test_synthetic_data_written_as_tsv_reads_back(tmp_path):
    from lightning_bagpipe.data.synthetic import SyntheticCriteo, write_criteo_tsv

    source = SyntheticCriteo(300, 3, scale=0.01, seed=5)
    assert write_criteo_tsv(source, tmp_path / "s.tsv.gz", compress=True) == 900
    # Rows are written as hashes; modulo (size + 1) maps row r to r + 1 (row 0 is the missing row).
    reader = CriteoTSV(tmp_path / "s.tsv.gz", 300, hashing=ModuloHashing((source.tables.sizes + 1).tolist()))
    got = list(reader)
    assert len(got) == 3
    for a, b in zip(source, got):
        assert torch.equal(a.sparse.values + 1, b.sparse.values)
        assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = write(tmp_path / "t.gz", random_lines(np.random.default_rng(8), 200), gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"t\.gz: cannot read"):
        list(CriteoTSV(path, 64, hashing=ModuloHashing(SIZES)))
