"""Random-walk propagation of a response map inside predicted boundaries (IRN's ``propagate_to_edge``).

IRN builds the dense affinity matrix ``A`` over all ``hw`` pixels of the stride-4 grid (``a_ij = 1 - max
B`` on the segment i->j for pairs within ``radius``, self-affinity 1, 0 elsewhere, symmetric), raises it
element-wise to ``beta``, normalises columns into the transition matrix ``T = A / colsum(A)``, squares
``T`` ``exp_times`` times and propagates ``x_rw = (x * (1 - B)) @ T^(2^exp_times)``.

:func:`random_walk_dense` is that reference, faithful but ``O((hw)^2)`` in memory (1.5 GB per matrix at
160x120). :func:`random_walk` computes the same thing without ever forming a dense matrix: because ``A``
is symmetric, ``(x @ T)_j = sum_i A_ij x_i / D_j`` is a local stencil over the ``2K + 1`` neighbours of
``j`` (per-offset affinity maps of shape ``(K, h, w)``), stored as a sparse CSR matrix and applied
``2^exp_times`` times, which equals multiplying by ``T^(2^exp_times)``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pipeline.pseudo.affinity import pair_affinity, path_offsets


def _check(x: torch.Tensor, boundary: torch.Tensor) -> None:
    if x.dim() != 3 or boundary.dim() != 2 or x.shape[-2:] != boundary.shape:
        raise ValueError(
            f"expected x (C, h, w) and boundary (h, w), got {tuple(x.shape)} and {tuple(boundary.shape)}"
        )


def transition_matrix_dense(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """IRN's dense ``T = A^beta / colsum(A^beta)`` of shape ``(hw, hw)`` (row-major pixel order).

    Affinities are computed here pixel-pair by pixel-pair from the path definition, independently of
    the shifted-slice :func:`pair_affinity`, so the two implementations check each other.
    Intermediates are updated in place: peak memory is one ``(hw, hw)`` matrix plus index vectors.
    """
    h, w = boundary.shape
    n = h * w
    ys, xs = torch.meshgrid(
        torch.arange(h, device=boundary.device), torch.arange(w, device=boundary.device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()
    A = torch.zeros(n, n, dtype=boundary.dtype, device=boundary.device)
    for off in path_offsets(radius):
        dy, dx = ys + off.dy, xs + off.dx
        inside = (dy >= 0) & (dy < h) & (dx >= 0) & (dx < w)  # pairs leaving the image do not exist
        sy, sx = ys[inside], xs[inside]
        on_path = torch.stack([boundary[sy + py, sx + px] for py, px in off.path])
        aff = 1.0 - on_path.amax(dim=0)
        src, dst = sy * w + sx, (sy + off.dy) * w + (sx + off.dx)
        A[src, dst] = aff
        A[dst, src] = aff
    A.fill_diagonal_(1.0)
    A.pow_(beta)
    A.div_(A.sum(dim=0, keepdim=True))
    return A


def random_walk_dense(
    x: torch.Tensor, boundary: torch.Tensor, radius: int, beta: float, exp_times: int
) -> torch.Tensor:
    """Reference random walk with the dense ``(hw, hw)`` transition matrix, exactly as IRN (small grids only).

    ``x``: ``(C, h, w)`` maps, ``boundary``: ``(h, w)`` in [0, 1]. Returns ``(C, h, w)``.
    """
    _check(x, boundary)
    c, h, w = x.shape
    T = transition_matrix_dense(boundary.to(x.dtype), radius, beta)
    for _ in range(exp_times):
        T = T @ T
    seeds = (x * (1.0 - boundary.to(x.dtype))).reshape(c, h * w)
    return (seeds @ T).reshape(c, h, w)


def stencil_weights(boundary: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-normalised weights ``(2K + 1, h, w)`` and neighbour shifts ``(2K + 1, 2)`` of one walk step.

    Row 0 is the pixel itself (self-affinity 1), rows ``1..K`` its forward neighbours ``j + o_k`` and rows
    ``K+1..2K`` its backward neighbours ``j - o_k`` (the same pair seen from the other end, i.e. the
    forward affinity map shifted by ``o_k``). Non-existent pairs (outside the image) weigh 0.
    """
    offsets = path_offsets(radius)
    pad = int(radius) - 1
    h, w = boundary.shape
    fwd = pair_affinity(boundary, radius).clamp_(min=0).pow_(beta)  # (K, h, w), at the source pixel
    fwd_p = F.pad(fwd, (pad, pad, pad, pad))
    bwd = torch.stack(
        [fwd_p[k, pad - o.dy : pad - o.dy + h, pad - o.dx : pad - o.dx + w] for k, o in enumerate(offsets)]
    )
    weights = torch.cat([torch.ones_like(boundary).unsqueeze(0), fwd, bwd])
    del fwd_p
    weights /= weights.sum(dim=0, keepdim=True)  # T's column sums D_j, per pixel j
    shifts = [(0, 0)] + [(o.dy, o.dx) for o in offsets] + [(-o.dy, -o.dx) for o in offsets]
    return weights, torch.tensor(shifts, device=boundary.device)


def _transposed_transition_csr(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """``T^T`` as a ``(hw, hw)`` CSR matrix: row ``j`` holds ``T[i, j]`` for the ``<= 2K + 1`` pixels ``i``
    around ``j``, so ``T^T @ X == (X^T @ T)^T``. Built directly in CSR form (int32 indices), never dense."""
    h, w = boundary.shape
    dev = boundary.device
    weights, shifts = stencil_weights(boundary, radius, beta)
    flat_shift = shifts[:, 0] * w + shifts[:, 1]
    order = torch.argsort(flat_shift)  # ascending column offsets -> sorted column indices in every row
    weights, shifts, flat_shift = weights[order], shifts[order], flat_shift[order]
    # int32 indices and broadcast row/column tests keep the build at O(S * h * w) *bytes*, not int64s
    ys = torch.arange(h, device=dev, dtype=torch.int32).view(1, h, 1) + shifts[:, 0].view(-1, 1, 1).int()
    xs = torch.arange(w, device=dev, dtype=torch.int32).view(1, 1, w) + shifts[:, 1].view(-1, 1, 1).int()
    inside = ((ys >= 0) & (ys < h)) & ((xs >= 0) & (xs < w))  # (S, h, w) bool
    inside = inside.reshape(len(shifts), h * w).T  # (hw, S): row j lists its neighbours in column order
    pixel = torch.arange(h * w, device=dev, dtype=torch.int32)
    cols = (pixel.view(-1, 1) + flat_shift.int().view(1, -1))[inside]
    vals = weights.reshape(len(shifts), h * w).T[inside]
    crow = torch.zeros(h * w + 1, dtype=torch.int32, device=dev)
    crow[1:] = inside.sum(dim=1).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is stable in practice
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, size=(h * w, h * w), check_invariants=False)


def random_walk(
    x: torch.Tensor, boundary: torch.Tensor, radius: int, beta: float, exp_times: int
) -> torch.Tensor:
    """Sparse random walk equal to :func:`random_walk_dense` (``x * (1 - B)`` times ``T^(2^exp_times)``).

    ``T`` is stored as a sparse CSR matrix with ``<= (2K + 1) * h * w`` entries (``K ~ radius^2`` offsets)
    and applied ``2^exp_times`` times as sparse matrix products, instead of squaring a dense ``(hw)^2``
    matrix. A CSR product costs one library call per step: on a 32x32 grid the 256 steps take ~20 ms
    on one CPU core (a per-offset shifted-add loop needs ~17k small ops, ~10x slower there).
    Runs on the tensors' device; ``x``'s dtype sets the precision.
    """
    _check(x, boundary)
    c, h, w = x.shape
    boundary = boundary.to(x.dtype)
    transition_t = _transposed_transition_csr(boundary, radius, beta)
    state = (x * (1.0 - boundary)).reshape(c, h * w).T.contiguous()  # (hw, C)
    for _ in range(2 ** int(exp_times)):
        state = transition_t @ state
    return state.T.reshape(c, h, w)
