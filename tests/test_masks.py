"""Layout masks against an independent per-element definition, tile tables, decode key lists."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_fast import KINDS, Layout, paper_schedule


def brute_allowed(kind, T, S, K, d, q, k):
    """docs/design.md's mask table, written out element by element (independent of masks.py)."""
    if k > q:
        return False
    if q < T or k < T:  # text query sees earlier text; any query sees all (earlier) text
        return True
    m, mk = q - T, k - T
    r, c = divmod(m, S)
    rk, ck = divmod(mk, S)
    if kind == "full":
        return True
    if kind == "row":
        return m - S <= mk <= m
    if kind == "col":
        return (m - mk) % S == 0 and mk <= m
    if kind == "conv":
        return r - K // 2 <= rk <= r and abs(ck - c) <= K // 2 and mk <= m
    if kind == "axial_row":
        return rk == r and ck <= c
    if kind == "axial_col":
        return ck == c and rk <= r
    if kind == "conv_like":
        for a in range(K):
            for b in range(K):
                if rk == r - a * d and ck == c - b * d:
                    return True
        return False
    raise AssertionError(kind)


def brute_mask(layout, n=None):
    n = layout.seq_len if n is None else n
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            out[q, k] = brute_allowed(layout.kind, layout.text_len, layout.image_size,
                                      layout.kernel_size, layout.dilation, q, k)
    return out


CASES = [
    # (text_len, image_size, kernel_size, dilation)
    (1, 4, 3, 1),
    (7, 5, 3, 1),
    (4, 6, 5, 1),
    (3, 7, 3, 2),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,S,K,d", CASES)
def test_dense_mask_matches_brute_force(kind, T, S, K, d):
    if kind != "conv_like":
        d = 1
    layout = Layout(kind, T, S, kernel_size=K, dilation=d)
    expected = brute_mask(layout)
    assert torch.equal(layout.dense_mask(), expected)
    # a shorter run is the leading block of the full mask
    n = layout.seq_len - S - 1
    assert torch.equal(layout.dense_mask(n), expected[:n, :n])


def test_paper_defaults_and_counts():
    # the paper's sizes: every kind allows at most the documented number of image keys
    T, S = 256, 32
    for kind, max_img in (("row", S + 1), ("col", S), ("conv", 6 * 11 - 5), ("axial_row", S),
                          ("axial_col", S)):
        layout = Layout(kind, T, S)
        counts = layout.dense_mask().sum(1) - T
        assert int(counts[T:].max()) <= max_img, kind
    assert Layout("conv", T, S).kernel_size == 11
    assert Layout("full", T, S).seq_len == 1280


@pytest.mark.parametrize("kind", KINDS)
def test_permutation_is_causal_and_column_major(kind):
    layout = Layout(kind, 5, 4, kernel_size=3)
    for n in (layout.seq_len, layout.seq_len - 3, 7):
        perm = layout.permutation(n)
        assert sorted(perm.tolist()) == list(range(n))
        mask = layout.dense_mask(n)
        pm = mask[perm][:, perm]
        # allowed pairs stay at or below the diagonal in processing order
        assert not torch.triu(pm, diagonal=1).any()
        if kind in ("col", "axial_col") and n > 5:
            img = perm[5:] - 5
            cols = (img % 4).tolist()
            assert cols == sorted(cols)  # column-major: columns ascend
        else:
            assert torch.equal(perm, torch.arange(n))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bm,bn", [(16, 16), (64, 32), (8, 16)])
def test_tile_table_covers_mask_exactly(kind, bm, bn):
    layout = Layout(kind, 7, 6, kernel_size=3)
    for n in (layout.seq_len, 30):
        table = layout.tile_table(n, bm, bn)
        perm = table.perm
        mask = layout.dense_mask(n)[perm][:, perm]
        covered = torch.zeros_like(mask)
        for i in range(table.num_q_tiles):
            lo, hi = int(table.row_ptr[i]), int(table.row_ptr[i + 1])
            tiles = table.col_idx[lo:hi].tolist()
            nfull = int(table.num_full[i])
            assert tiles[:nfull] == sorted(tiles[:nfull]) and tiles[nfull:] == sorted(tiles[nfull:])
            for pos, j in enumerate(tiles):
                block = mask[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                assert block.any()
                full = pos < nfull
                in_range = block.shape == (bm, bn)
                assert full == bool(block.all() and in_range)
                covered[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = True
        # every allowed pair is inside a listed tile; listed tiles are non-empty (checked above)
        assert not (mask & ~covered).any()
        # the transpose lists the same tiles
        pairs = {(i, int(j)) for i in range(table.num_q_tiles)
                 for j in table.col_idx[int(table.row_ptr[i]):int(table.row_ptr[i + 1])]}
        t_pairs = {(int(i), j) for j in range(table.num_k_tiles)
                   for i in table.t_col_idx[int(table.t_row_ptr[j]):int(table.t_row_ptr[j + 1])]}
        assert pairs == t_pairs
        assert table.computed_pairs() <= n * n


def test_tile_table_is_cached_and_padded():
    layout = Layout("row", 16, 4)
    t1 = layout.tile_table(None, 16, 16)
    assert t1 is layout.tile_table(layout.seq_len, 16, 16)
    perm, lut, counts, num_full, t_lut, t_counts, t_num_full = t1.padded()
    assert lut.shape[0] == t1.num_q_tiles and counts.sum() == t1.nnz
    # each padded row is its CSR row (same tiles, same order: full ones first), then padding
    for lut_, counts_, num_full_, ptr, idx, nf in ((lut, counts, num_full, t1.row_ptr, t1.col_idx, t1.num_full),
                                                   (t_lut, t_counts, t_num_full, t1.t_row_ptr, t1.t_col_idx,
                                                    t1.t_num_full)):
        assert torch.equal(num_full_, nf)
        for i in range(lut_.shape[0]):
            c = int(counts_[i])
            assert c == int(ptr[i + 1] - ptr[i])
            assert torch.equal(lut_[i, :c], idx[int(ptr[i]):int(ptr[i + 1])]), i
    assert t1.padded() is t1.padded("cpu")


def test_column_tiles_as_sparse_as_row_tiles():
    # the transposed addressing makes column layers cost what row layers cost
    row = Layout("row", 256, 32).tile_table(None, 64, 32).computed_pairs()
    col = Layout("col", 256, 32).tile_table(None, 64, 32).computed_pairs()
    dense = 1280 * 1280
    assert col <= 1.05 * row < 0.3 * dense


@pytest.mark.parametrize("kind", KINDS)
def test_decode_keys(kind):
    layout = Layout(kind, 5, 4, kernel_size=3)
    mask = layout.dense_mask()
    for pos in range(layout.seq_len):
        assert layout.decode_keys(pos).tolist() == mask[pos].nonzero().flatten().tolist()
    assert layout.max_decode_keys() == int(mask.sum(1).max())


def test_paper_schedule():
    assert paper_schedule(1) == ["conv"]
    assert paper_schedule(6) == ["row", "col", "row", "row", "row", "conv"]
    s = paper_schedule(64)
    assert len(s) == 64 and s[-1] == "conv"
    assert [i for i, k in enumerate(s, 1) if k == "col"] == list(range(2, 64, 4))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(kind="diag", text_len=4, image_size=4), "kind"),
        (dict(kind=["row"], text_len=4, image_size=4), "kind"),  # (was: TypeError, unhashable list)
        (dict(kind="row", text_len=0, image_size=4), "text_len"),
        (dict(kind="row", text_len=4, image_size=-1), "image_size"),
        (dict(kind="conv", text_len=4, image_size=4, kernel_size=4), "kernel_size"),
        (dict(kind="conv_like", text_len=4, image_size=4, kernel_size=0), "kernel_size"),
        (dict(kind="row", text_len=4, image_size=4, dilation=2), "dilation"),
        (dict(kind="row", text_len=4.0, image_size=4), "text_len"),
    ],
)
def test_layout_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Layout(**kwargs)


def test_bad_seq_len_and_pos():
    layout = Layout("row", 4, 3)
    with pytest.raises(ValueError, match="seq_len"):
        layout.dense_mask(layout.seq_len + 1)
    with pytest.raises(ValueError, match="seq_len"):
        layout.dense_mask(0)
    with pytest.raises(ValueError, match="pos"):
        layout.decode_keys(layout.seq_len)
    with pytest.raises(ValueError, match="block_m"):
        layout.tile_table(None, 0, 16)
    with pytest.raises(ValueError, match="depth"):
        paper_schedule(0)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    T=st.integers(1, 6),
    S=st.integers(1, 5),
    K=st.sampled_from([1, 3, 5]),
    d=st.integers(1, 2),
    data=st.data(),
)
def test_random_layouts_match_brute_force(kind, T, S, K, d, data):
    layout = Layout(kind, T, S, kernel_size=K, dilation=d if kind == "conv_like" else 1)
    n = data.draw(st.integers(1, layout.seq_len))
    assert torch.equal(layout.dense_mask(n), brute_mask(layout, n))


def test_max_decode_keys_is_exact_beyond_8192_positions():
    """Above 8192 positions max_decode_keys returned seq_len instead of the largest key count."""
    T, S = 256, 91  # 8537 positions
    for kind, img in (("row", S + 1), ("col", S), ("axial_row", S), ("axial_col", S), ("conv", 6 * 11 - 5),
                      ("full", S * S)):
        layout = Layout(kind, T, S)
        assert layout.seq_len > 8192
        assert layout.max_decode_keys() == T + img, kind
    layout = Layout("conv_like", T, S, kernel_size=5, dilation=2)
    assert layout.max_decode_keys() == T + 25
    assert layout.max_decode_keys() == max(layout.decode_keys(p).numel() for p in range(layout.seq_len - S,
                                                                                          layout.seq_len))


@pytest.mark.parametrize("tiles,name", [(((16.5, 16),), "block_m"), (((16, "16"),), "block_n"),
                                        (((True, 16),), "block_m"), ((16, 16), "tiles"), (((16, 16, 16),), "tiles")])
def test_packed_tile_tables_reject_non_int_tiles(tiles, name):
    """Tile sizes were passed through int(): 16.5 and "16" silently became 16; a flat pair crashed."""
    with pytest.raises(ValueError, match=name):
        Layout("row", 4, 3).packed_tile_tables(None, tiles)
