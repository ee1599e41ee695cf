"""Layout specs: the attention masks of DALL-E-style transformers.

A sequence is ``text_len`` text positions followed by ``image_size**2`` image positions in raster
order. Position ``q`` attends to position ``k`` only if ``k <= q``; text queries see all earlier
text; image queries see all text plus the image keys their layer's kind allows (docs/design.md,
"Sequence and masks"). This module is the single Python definition of those semantics; the C++
header ``csrc/common/mask.h`` implements the same predicate for the kernels and the tests check
both against an independent brute force.

Besides dense masks it builds what the kernels walk:

* ``Layout.permutation(seq_len)``: the order in which kernels process positions. Identity for all
  kinds except ``col``/``axial_col``, whose image part is visited column-major (the paper's
  transposed addressing), which turns the column mask into contiguous causal segments so that
  column layers cost what row layers cost.
* ``Layout.tile_table(seq_len, block_m, block_n)``: block-sparse tables in permuted space (for
  each query tile its non-empty key tiles, full ones first; and the transpose for backward).
* ``Layout.decode_keys(pos)``: the keys a single query may read during KV-cached decoding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import List, Optional

import torch

__all__ = ["KINDS", "Layout", "TileTable", "PackedTileTables", "paper_schedule"]

#: Mask kinds in the order of their integer ids (the id is what the C++/CUDA/Triton kernels take).
KINDS = ("full", "row", "col", "conv", "axial_row", "axial_col", "conv_like")
KIND_IDS = {name: i for i, name in enumerate(KINDS)}
#: Longest sequence ``text_len + image_size**2`` a Layout may describe: the kernels address positions
#: and tile offsets with int32.
MAX_SEQ_LEN = 2**31 - 1
# kinds whose kernels visit the image part column-major
_TRANSPOSED = frozenset({"col", "axial_col"})


def _int_at_least(name: str, value, low: int) -> int:
    """``value`` if it is an int (not a bool) ``>= low``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be {'positive' if low == 1 else f'>= {low}'}, got {value}")
    return value


def _positive_int(name: str, value) -> int:
    return _int_at_least(name, value, 1)


@dataclass(frozen=True)
class TileTable:
    """Block-sparse schedule of one (layout, seq_len, block_m, block_n), in permuted space.

    Rows of the attention matrix are grouped into query tiles of ``block_m`` permuted positions,
    columns into key tiles of ``block_n``. A tile is *full* when every (query, key) pair in it is
    in range and allowed (the kernel may skip the element mask); otherwise *partial*.

    Attributes (all int32 CPU tensors unless noted):
        perm:        (seq_len,) int64, ``perm[i]`` = sequence position processed at slot ``i``.
        row_ptr:     (num_q_tiles + 1,) CSR offsets into ``col_idx`` per query tile.
        col_idx:     (nnz,) key tile indices; within a query tile full tiles come first, then
                     partial ones, each group ascending.
        num_full:    (num_q_tiles,) number of full tiles at the start of each query tile's list.
        t_row_ptr, t_col_idx, t_num_full: the transpose (for each key tile, its query tiles).
    """

    seq_len: int
    block_m: int
    block_n: int
    perm: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    num_full: torch.Tensor
    t_row_ptr: torch.Tensor
    t_col_idx: torch.Tensor
    t_num_full: torch.Tensor
    is_identity: bool
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_q_tiles(self) -> int:
        return self.row_ptr.numel() - 1

    @property
    def num_k_tiles(self) -> int:
        return self.t_row_ptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    def computed_pairs(self) -> int:
        """Number of (query, key) score entries the kernels compute (in-range part of each tile)."""
        n, bm, bn = self.seq_len, self.block_m, self.block_n
        rows = torch.clamp(n - torch.arange(self.num_q_tiles) * bm, max=bm)
        cols = torch.clamp(n - torch.arange(self.num_k_tiles) * bn, max=bn)
        counts = self.row_ptr[1:] - self.row_ptr[:-1]
        q_of = torch.repeat_interleave(torch.arange(self.num_q_tiles), counts.long())
        return int((rows[q_of] * cols[self.col_idx.long()]).sum())

    def padded(self, device=None):
        """The table as padded 2-D lookup tensors on ``device`` (cached per device).

        Returns ``(perm, lut, counts, num_full, t_lut, t_counts, t_num_full)`` where
        ``lut`` is ``(num_q_tiles, max_tiles)`` int32 (rows padded with 0) and ``counts`` the number
        of valid entries per row; ``t_*`` is the transpose.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = str(device)
        hit = self._device_cache.get(key)
        if hit is None:
            lut, counts = _csr_to_padded(self.row_ptr, self.col_idx)
            t_lut, t_counts = _csr_to_padded(self.t_row_ptr, self.t_col_idx)
            hit = tuple(
                t.to(device)
                for t in (self.perm, lut, counts, self.num_full, t_lut, t_counts, self.t_num_full)
            )
            self._device_cache[key] = hit
        return hit


def _csr_to_padded(row_ptr: torch.Tensor, col_idx: torch.Tensor):
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    lut = torch.zeros(counts.numel(), width, dtype=torch.int32)
    slot = torch.arange(width).unsqueeze(0)
    valid = slot < counts.unsqueeze(1)
    lut[valid] = col_idx
    return lut, counts


def _blocks_to_csr(any_: torch.Tensor, all_: torch.Tensor):
    """(rows, cols) bool block maps -> CSR with full blocks first, each group ascending."""
    rows, cols = any_.shape
    full = all_ & any_
    part = any_ & ~all_
    # sort key: full tiles first (0), partial second (1), then column
    order_key = torch.where(full, 0, torch.where(part, 1, 2)) * cols + torch.arange(cols)
    sorted_key, _ = torch.sort(order_key, dim=1)
    counts = any_.sum(1)
    valid = torch.arange(cols).unsqueeze(0) < counts.unsqueeze(1)
    col_idx = (sorted_key % cols)[valid].to(torch.int32)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return row_ptr, col_idx, full.sum(1).to(torch.int32)


#: Header of :class:`PackedTileTables`: one 8-int record per tile shape (block_m, block_n), both
#: multiples of 16 in [16, 128], at record index ``(block_m // 16) * 9 + block_n // 16``.
PACKED_TILE_STEP = 16
PACKED_RECORD = 8
PACKED_SLOTS = 9 * 9


@dataclass(frozen=True)
class PackedTileTables:
    """Tile tables of one (layout, seq_len) for several tile shapes, packed into one int32 buffer.

    One device buffer serves every tile shape a kernel may be tuned to; the record of shape
    ``(bm, bn)`` (:meth:`record`; the launch passes its offsets to the kernel as arguments) sits at
    ``tables[8 * ((bm // 16) * 9 + bn // 16) : ... + 8]`` and holds absolute offsets into ``tables``: ``(lut, lut_width, counts, num_full, t_lut, t_lut_width, t_counts, t_num_full)``,
    the padded forms of :meth:`TileTable.padded` (row ``i`` of ``lut`` starts at
    ``lut + i * lut_width``). Records of shapes not packed are -1.

    Attributes:
        seq_len: the run length the tables describe.
        tiles: the packed ``(block_m, block_n)`` shapes.
        perm: ``(seq_len,)`` int32, :meth:`Layout.permutation` (slot -> position).
        tables: ``(81 * 8 + payload,)`` int32, header then payload.
    """

    seq_len: int
    tiles: tuple
    perm: torch.Tensor
    tables: torch.Tensor
    is_identity: bool
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def record(self, block_m: int, block_n: int) -> List[int]:
        """The 8 header ints of tile shape ``(block_m, block_n)`` (host-side; for tests and checks)."""
        i = _packed_slot(block_m, block_n)
        return self.tables[i * PACKED_RECORD:(i + 1) * PACKED_RECORD].tolist()

    def on(self, device):
        """``(perm, tables)`` on ``device``, cached per device (built once, reused by every call)."""
        key = str(torch.device(device))
        hit = self._device_cache.get(key)
        if hit is None:
            hit = (self.perm.to(device), self.tables.to(device))
            self._device_cache[key] = hit
        return hit


def _packed_slot(block_m: int, block_n: int) -> int:
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b % PACKED_TILE_STEP or not PACKED_TILE_STEP <= b <= 8 * PACKED_TILE_STEP:
            raise ValueError(f"{name} must be a multiple of 16 in [16, 128] for packed tables, got {b}")
    return (block_m // PACKED_TILE_STEP) * 9 + block_n // PACKED_TILE_STEP


@dataclass(frozen=True)
class Layout:
    """One layer's attention pattern over ``text_len`` text + ``image_size**2`` image positions.

    Args:
        kind: one of ``KINDS``: ``full``, ``row``, ``col``, ``conv``, ``axial_row``,
            ``axial_col``, ``conv_like`` (semantics in docs/design.md).
        text_len: number of text positions ``T`` (>= 1).
        image_size: side ``S`` of the image token grid (>= 1).
        kernel_size: ``K`` for ``conv`` (odd) and ``conv_like``; ignored by other kinds.
        dilation: ``d`` for ``conv_like``; must be 1 for other kinds.
    """

    kind: str
    text_len: int
    image_size: int
    kernel_size: int = 11
    dilation: int = 1

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in KIND_IDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        _positive_int("text_len", self.text_len)
        _positive_int("image_size", self.image_size)
        _positive_int("kernel_size", self.kernel_size)
        _positive_int("dilation", self.dilation)
        for name in ("text_len", "kernel_size", "dilation"):
            if getattr(self, name) > MAX_SEQ_LEN:
                raise ValueError(f"{name} must be at most {MAX_SEQ_LEN}, got {getattr(self, name)}")
        if self.seq_len > MAX_SEQ_LEN:
            raise ValueError(f"text_len + image_size**2 = {self.seq_len} exceeds {MAX_SEQ_LEN}, the longest "
                             f"sequence the kernels address (int32 positions); got text_len={self.text_len}, "
                             f"image_size={self.image_size}")
        if self.kind == "conv" and self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for kind 'conv', got {self.kernel_size}")
        if self.dilation != 1 and self.kind != "conv_like":
            raise ValueError(f"dilation applies to kind 'conv_like' only, got {self.dilation} for {self.kind!r}")

    # ------------------------------------------------------------------ basic facts
    @property
    def kind_id(self) -> int:
        return KIND_IDS[self.kind]

    @property
    def seq_len(self) -> int:
        """Full sequence length ``text_len + image_size**2``."""
        return self.text_len + self.image_size * self.image_size

    @property
    def transposed(self) -> bool:
        """Whether kernels visit the image part column-major (column kinds)."""
        return self.kind in _TRANSPOSED

    def params(self):
        """The integers every kernel takes: ``(kind_id, text_len, image_size, kernel_size, dilation)``."""
        return (self.kind_id, self.text_len, self.image_size, self.kernel_size, self.dilation)

    def check_seq_len(self, seq_len: Optional[int], name: str = "seq_len") -> int:
        if seq_len is None:
            return self.seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise ValueError(f"{name} must be an int, got {type(seq_len).__name__}")
        if seq_len <= 0 or seq_len > self.seq_len:
            raise ValueError(
                f"{name} must be in [1, {self.seq_len}] for this layout "
                f"(text_len={self.text_len}, image_size={self.image_size}), got {seq_len}"
            )
        return seq_len

    # ------------------------------------------------------------------ the predicate
    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Elementwise mask predicate on broadcastable int64 position tensors (True = may attend)."""
        T, S = self.text_len, self.image_size
        causal = k <= q
        image_pair = (q >= T) & (k >= T)
        if self.kind == "full":
            return causal
        m, mk = q - T, k - T
        r, c = torch.div(m, S, rounding_mode="floor"), torch.remainder(m, S)
        rk, ck = torch.div(mk, S, rounding_mode="floor"), torch.remainder(mk, S)
        K, d = self.kernel_size, self.dilation
        if self.kind == "row":
            img = mk >= m - S
        elif self.kind in ("col", "axial_col"):
            img = ck == c
        elif self.kind == "conv":
            img = (rk >= r - K // 2) & (rk <= r) & ((ck - c).abs() <= K // 2)
        elif self.kind == "axial_row":
            img = rk == r
        else:  # conv_like
            dr, dc = r - rk, c - ck
            img = (
                (dr >= 0) & (dc >= 0)
                & (dr % d == 0) & (dc % d == 0)
                & (dr // d < K) & (dc // d < K)
            )
        return causal & (~image_pair | img)

    def dense_mask(self, seq_len: Optional[int] = None, device=None) -> torch.Tensor:
        """``BoolTensor[seq_len, seq_len]``, True where query (row) may attend to key (column)."""
        n = self.check_seq_len(seq_len)
        idx = torch.arange(n, device=device)
        return self.allowed(idx[:, None], idx[None, :])

    # ------------------------------------------------------------------ kernel schedules
    def permutation(self, seq_len: Optional[int] = None) -> torch.Tensor:
        """``LongTensor[seq_len]``: positions in the order the kernels process them.

        Identity except for column kinds, where the image positions present in a run of length
        ``seq_len`` are sorted by (column, row), so each column is a contiguous causal segment.
        """
        n = self.check_seq_len(seq_len)
        return _permutation(self, n)

    def tile_table(self, seq_len: Optional[int] = None, block_m: int = 64, block_n: int = 64) -> TileTable:
        """Block-sparse :class:`TileTable` for tiles of ``block_m`` queries x ``block_n`` keys (cached)."""
        n = self.check_seq_len(seq_len)
        _positive_int("block_m", block_m)
        _positive_int("block_n", block_n)
        return _tile_table(self, n, block_m, block_n)

    def packed_tile_tables(self, seq_len: Optional[int] = None, tiles=((64, 64),)) -> PackedTileTables:
        """:class:`PackedTileTables` of the tile shapes ``tiles`` (pairs ``(block_m, block_n)``), cached."""
        n = self.check_seq_len(seq_len)
        pairs = set()
        for tile in tiles:
            if not isinstance(tile, (tuple, list)) or len(tile) != 2:
                raise ValueError(f"tiles must hold (block_m, block_n) pairs, got {tile!r}")
            pairs.add((_positive_int("block_m", tile[0]), _positive_int("block_n", tile[1])))
        tiles = tuple(sorted(pairs))
        for bm, bn in tiles:
            _packed_slot(bm, bn)
        return _packed_tile_tables(self, n, tiles)

    def decode_keys(self, pos: int) -> torch.Tensor:
        """``LongTensor``: ascending key positions a query at position ``pos`` attends to."""
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < self.seq_len:
            raise ValueError(f"pos must be an int in [0, {self.seq_len}), got {pos!r}")
        keys = torch.arange(pos + 1)
        return keys[self.allowed(torch.tensor(pos), keys)]

    def max_decode_keys(self) -> int:
        """Largest number of keys any single query attends to (what a decode step may read).

        Exact for every size: a text query reads at most ``T`` keys, an image query all ``T`` text
        keys plus an image window that only the top and left image edges clip (``full``: every
        earlier key), so the queries of the last image row hold the maximum; only they are evaluated.
        """
        n, S = self.seq_len, self.image_size
        q = torch.arange(n - S, n)
        return int(self.allowed(q[:, None], torch.arange(n)[None, :]).sum(1).max())

    def __str__(self):
        extra = ""
        if self.kind in ("conv", "conv_like"):
            extra = f", kernel_size={self.kernel_size}"
            if self.kind == "conv_like":
                extra += f", dilation={self.dilation}"
        return f"Layout({self.kind!r}, text_len={self.text_len}, image_size={self.image_size}{extra})"


@functools.lru_cache(maxsize=256)
def _permutation(layout: Layout, n: int) -> torch.Tensor:
    idx = torch.arange(n)
    T, S = layout.text_len, layout.image_size
    if not layout.transposed or n <= T:
        return idx
    m = idx[T:] - T
    r, c = m // S, m % S
    order = torch.argsort(c * (S + 1) + r, stable=True)
    return torch.cat([idx[:T], idx[T:][order]])


@functools.lru_cache(maxsize=256)
def _tile_table(layout: Layout, n: int, bm: int, bn: int) -> TileTable:
    perm = _permutation(layout, n)
    mask = layout.allowed(perm[:, None], perm[None, :])
    nq, nk = -(-n // bm), -(-n // bn)
    padded = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
    padded[:n, :n] = mask
    blocks = padded.view(nq, bm, nk, bn)
    any_ = blocks.any(dim=3).any(dim=1)
    # out-of-range slots are False, so a tile reaching past the sequence end is never full
    all_ = blocks.all(dim=3).all(dim=1)
    row_ptr, col_idx, num_full = _blocks_to_csr(any_, all_)
    t_row_ptr, t_col_idx, t_num_full = _blocks_to_csr(any_.t().contiguous(), all_.t().contiguous())
    return TileTable(
        seq_len=n, block_m=bm, block_n=bn, perm=perm,
        row_ptr=row_ptr, col_idx=col_idx, num_full=num_full,
        t_row_ptr=t_row_ptr, t_col_idx=t_col_idx, t_num_full=t_num_full,
        is_identity=bool(torch.equal(perm, torch.arange(n))),
    )


@functools.lru_cache(maxsize=256)
def _packed_tile_tables(layout: Layout, n: int, tiles: tuple) -> PackedTileTables:
    header = torch.full((PACKED_SLOTS * PACKED_RECORD,), -1, dtype=torch.int32)
    parts, offset = [], header.numel()
    for bm, bn in tiles:
        table = _tile_table(layout, n, bm, bn)
        _, lut, counts, num_full, t_lut, t_counts, t_num_full = table.padded()
        record = []
        for arrays in ((lut, counts, num_full), (t_lut, t_counts, t_num_full)):
            for j, a in enumerate(arrays):
                record.append(offset)
                if j == 0:
                    record.append(a.shape[1])  # row width of the padded lut
                parts.append(a.reshape(-1).to(torch.int32))
                offset += a.numel()
        slot = _packed_slot(bm, bn)
        header[slot * PACKED_RECORD:(slot + 1) * PACKED_RECORD] = torch.tensor(record, dtype=torch.int32)
    if offset >= 2**31:
        raise ValueError(f"packed tile tables too large ({offset} entries) for seq_len={n}")
    perm = _permutation(layout, n)
    return PackedTileTables(
        seq_len=n, tiles=tiles, perm=perm.to(torch.int32), tables=torch.cat([header] + parts),
        is_identity=bool(torch.equal(perm, torch.arange(n))),
    )


def paper_schedule(depth: int) -> List[str]:
    """The paper's per-layer kinds for a depth-``depth`` model.

    Layer ``i`` (1-indexed, ``i < depth``) uses ``col`` if ``(i - 2) % 4 == 0`` else ``row``;
    the last layer uses ``conv``.
    """
    _positive_int("depth", depth)
    kinds = ["col" if (i - 2) % 4 == 0 else "row" for i in range(1, depth)]
    return kinds + ["conv"]
