"""Index algebra shared by feature extraction and merging.

A slot's local indices map onto group channels through `root_idxs`; a channel may own several
local indices (e.g. 49 after flattening a 7x7 map into a Linear). `SlotLayout.positions[i, p]`
is the position, in the slot's index list, of the p-th local index of channel i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelfold.errors import FoldError


@dataclass(frozen=True)
class SlotLayout:
    idxs: torch.Tensor  # (m,) local indices
    positions: torch.Tensor  # (n, e) positions into idxs

    @classmethod
    def build(cls, idxs: list[int], root_idxs: list[int], n: int, where: str) -> SlotLayout:
        by_root: list[list[int]] = [[] for _ in range(n)]
        for pos, (local, root) in enumerate(zip(idxs, root_idxs, strict=True)):
            if not 0 <= root < n:
                raise FoldError(f"{where}: channel index {root} outside the group's {n} channels.")
            by_root[root].append((local, pos))
        expansion = {len(r) for r in by_root}
        if len(expansion) != 1 or 0 in expansion:
            raise FoldError(
                f"{where}: channels map onto unequal numbers of positions {sorted(expansion)}; "
                "this coupling cannot be folded. Pass the module in `ignored=`."
            )
        positions = [[pos for _, pos in sorted(r)] for r in by_root]
        return cls(torch.tensor(idxs, dtype=torch.long), torch.tensor(positions, dtype=torch.long))

    @property
    def n(self) -> int:
        return self.positions.shape[0]

    def check(self, tensor: torch.Tensor, axis: int, where: str) -> None:
        size = tensor.shape[axis]
        if self.idxs.numel() and int(self.idxs.max()) >= size:
            raise FoldError(f"{where}: the dependency graph maps channels to position "
                            f"{int(self.idxs.max())} of an axis of size {size}; this coupling "
                            "cannot be folded. Pass the module in `ignored=`.")

    def gather(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        """(n, e * rest) matrix: channel i's slice of `tensor` along `axis`, flattened."""
        moved = tensor.detach().movedim(axis, 0)
        sel = moved.index_select(0, self.idxs.to(moved.device))
        grouped = sel[self.positions.to(moved.device)]  # (n, e, *rest)
        return grouped.reshape(self.n, -1)

    def mix(self, tensor: torch.Tensor, axis: int, matrix: torch.Tensor,
            keep: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` whose channel keep[j] holds sum_i matrix[j, i] * channel i.

        Channels outside `keep` are left as they are (they are removed afterwards). Folding is
        the special case of a cluster-mean (producers) or cluster-sum (consumers) matrix. Math
        runs in float64 (the result is cast back), so fp16/bf16 models merge exactly.
        """
        dev = tensor.device
        moved = tensor.detach().movedim(axis, 0).double()
        idxs = self.idxs.to(dev)
        positions = self.positions.to(dev)
        grouped = moved.index_select(0, idxs)[positions]  # (n, e, *rest)
        matrix = matrix.to(dev, torch.float64)
        flat = grouped.reshape(self.n, -1)
        nonzero = matrix != 0
        if bool((nonzero.sum(0) <= 1).all()):
            # a cluster matrix (every channel feeds at most one kept channel): a weighted
            # scatter-add, O(n * rest) instead of the O(k * n * rest) matrix product
            rows = nonzero.to(torch.uint8).argmax(0)
            weights = matrix.gather(0, rows[None]).squeeze(0)
            mixed = torch.zeros(matrix.shape[0], flat.shape[1], dtype=flat.dtype, device=dev)
            mixed.index_add_(0, rows, flat * weights[:, None])
        else:
            mixed = matrix @ flat
        targets = idxs[positions[keep.to(dev)]].reshape(-1)  # (k*e,)
        out = moved.clone()
        out.index_copy_(0, targets, mixed.reshape(-1, *grouped.shape[2:]))
        return out.to(tensor.dtype).movedim(0, axis).contiguous()
