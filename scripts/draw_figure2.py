"""Draw the paper's Figure 2: the (N, C, H*W) cube with the set S_i of each mode shaded.

Usage: python scripts/draw_figure2.py [OUTPUT.png]   (default docs/figure2.png)
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

N, C, HW, G = 6, 6, 6, 3  # a small cube; group norm with 3 groups of 2 channels


def set_mask(mode: str) -> np.ndarray:
    """Boolean (N, C, HW) mask of the set that holds element (n=0, c=0, any position)."""
    mask = np.zeros((N, C, HW), dtype=bool)
    if mode == "Batch Norm":
        mask[:, 0, :] = True  # one channel, every sample
    elif mode == "Layer Norm":
        mask[0, :, :] = True  # one sample, every channel
    elif mode == "Instance Norm":
        mask[0, 0, :] = True  # one sample, one channel
    elif mode == "Group Norm":
        mask[0, : C // G, :] = True  # one sample, one group of C/G channels
    return mask


def draw(path: str) -> None:
    modes = ["Batch Norm", "Layer Norm", "Instance Norm", "Group Norm"]
    fig = plt.figure(figsize=(13, 3.8))
    for k, mode in enumerate(modes):
        ax = fig.add_subplot(1, 4, k + 1, projection="3d")
        mask = set_mask(mode)
        # Axes: x = C, y = N, z = H*W, as in the paper's drawing.
        shaded = mask.transpose(1, 0, 2)
        ax.voxels(shaded, facecolors="#3b75af", edgecolors="#1d3a57", linewidth=0.3, alpha=0.9)
        # The outline of the whole (C, N, H*W) tensor.
        for a in (0, C):
            for b in (0, N):
                ax.plot([a, a], [b, b], [0, HW], color="#555555", linewidth=0.8)
            for b in (0, HW):
                ax.plot([a, a], [0, N], [b, b], color="#555555", linewidth=0.8)
        for a in (0, N):
            for b in (0, HW):
                ax.plot([0, C], [a, a], [b, b], color="#555555", linewidth=0.8)
        ax.set_xlim(0, C)
        ax.set_ylim(0, N)
        ax.set_zlim(0, HW)
        ax.set_xlabel("C", labelpad=-8)
        ax.set_ylabel("N", labelpad=-8)
        ax.set_zlabel("H·W", labelpad=-8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.view_init(elev=22, azim=-58)
        ax.set_box_aspect((1, 1, 1))
        ax.set_title(mode, fontsize=12, pad=0)
    fig.suptitle(
        "The set S_i each method normalizes over (shaded): one formula, four choices of set",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else "docs/figure2.png")
