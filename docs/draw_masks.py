"""Draw the attention mask of every dalle_fast.Layout kind (docs/masks.md).

    python docs/draw_masks.py            # writes docs/masks/<kind>.png and docs/masks/image_<kind>.png

For each kind: the full (query x key) mask of a small sequence (T = 4 text positions + a 6x6 image;
text | image boundaries marked), and the image keys one query attends to, drawn on the image grid.
The pictures come from ``Layout.dense_mask``, the same predicate the kernels implement.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from dalle_fast import KINDS, Layout  # noqa: E402

T, S = 4, 6
PARAMS = {"conv": dict(kernel_size=3), "conv_like": dict(kernel_size=3, dilation=1)}
QUERY = (3, 3)  # image row, column of the query drawn on the grid
OUT = Path(__file__).resolve().parent / "masks"


def layout(kind: str) -> Layout:
    return Layout(kind, T, S, **PARAMS.get(kind, {}))


def draw_matrix(kind: str, path: Path) -> None:
    mask = layout(kind).dense_mask().float().numpy()
    fig, ax = plt.subplots(figsize=(2.6, 2.6), dpi=100)
    ax.imshow(mask, cmap=ListedColormap(["#f4f4f4", "#1f5fa8"]), interpolation="nearest")
    for edge in (T - 0.5,):
        ax.axhline(edge, color="#d04030", lw=0.8)
        ax.axvline(edge, color="#d04030", lw=0.8)
    ax.set_title(kind, fontsize=9)
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_grid(kind: str, path: Path) -> None:
    lay = layout(kind)
    q = T + QUERY[0] * S + QUERY[1]
    row = lay.dense_mask()[q, T:].view(S, S).float().numpy()
    row[QUERY] = 2.0
    fig, ax = plt.subplots(figsize=(1.6, 1.6), dpi=100)
    ax.imshow(row, cmap=ListedColormap(["#f4f4f4", "#1f5fa8", "#d04030"]), vmin=0, vmax=2)
    ax.set_xticks([x - 0.5 for x in range(S + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(S + 1)], minor=True)
    ax.grid(which="minor", color="#999999", lw=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(kind, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for kind in KINDS:
        draw_matrix(kind, OUT / f"{kind}.png")
        draw_grid(kind, OUT / f"image_{kind}.png")
    print(f"wrote {2 * len(KINDS)} pictures to {OUT}")


if __name__ == "__main__":
    main()
