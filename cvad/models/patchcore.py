"""PatchCore and its continual variants PatchCoreCL and PatchCoreCL++ (docs/methods.md section 4).

``continual`` chooses how banks meet a new task:

- ``refit``: one bank of the latest training data (single task, or ``joint`` on all tasks);
- ``cl``: one bank per task, total <= B, each floor(B/t); old banks re-subsampled with
  k-center at every task; inference scores every bank and keeps the lowest image score;
- ``cl++``: banks kept in greedy order and shrunk by truncation (prefix property); a
  test image is routed to the task with the nearest prototype (mean deepest feature map
  of the task's training images; with ``prototype: pooled`` its spatial average, as the
  paper's code does) and only that bank is scored.

The CL variants return, for every scored image, the task they routed it to
(``AnomalyOutput.routed_tasks``), so the protocol can report routing accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cvad.backbones import FeatureExtractor
from cvad.methods.patchcore import PatchCoreParams, PatchCoreSpec
from cvad.models.base import AnomalyModel, AnomalyOutput, Setup, Task
from cvad.models.components.coreset import DISTANCE_BLOCK, greedy_k_center, nearest
from cvad.models.components.maps import AnomalyMapHead, concat_at_first_grid
from cvad.models.components.stored import StoredMatrix, StoredRows, codec_for


class PatchCore(PatchCoreSpec, AnomalyModel):
    params: PatchCoreParams

    def __init__(self, params: PatchCoreParams, setup: Setup) -> None:
        super().__init__(params, setup)
        self.backbone = FeatureExtractor(setup.backbone, params.layers, setup.weights)
        self.head = AnomalyMapHead(setup.image_size, params.blur_sigma)
        compression = setup.compression
        codec = codec_for(compression.memory, compression.pq_subvectors, compression.pq_centroids)
        # One bank per task (or one), rows in greedy k-center order, kept as compression.memory says.
        self.banks = StoredRows(codec)
        # cl++ only: a row per task (the mean deepest map, flattened, or its spatial average); int8 under pq.
        self.stored_prototypes = StoredMatrix(
            self, "prototypes", codec_for("int8" if compression.memory == "pq" else compression.memory, per="row")
        )

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """Patch descriptors [B, P, D] (3x3-averaged, concatenated levels), their grid, and each image's
        routing feature."""
        maps = self.backbone(images)
        # Each level averaged over its own 3x3 neighbourhood before upsampling (PatchCore's local
        # aggregation): a coarse level's neighbourhood spans more of the image than 3 fine cells do.
        patches = concat_at_first_grid([F.avg_pool2d(m, kernel_size=3, stride=1, padding=1) for m in maps])
        deep = maps[-1].mean(dim=(2, 3)) if self.params.prototype == "pooled" else maps[-1]
        return patches.flatten(2).transpose(1, 2), tuple(patches.shape[-2:]), deep

    def budget(self, tasks: int, patches: int) -> int:
        if self.params.bank_ratio is not None:
            return max(1, int(self.params.bank_ratio * patches))
        return self.params.bank_size // tasks

    @torch.no_grad()
    def fit_task(self, task: Task) -> None:
        descriptors, deep_sum, images = [], None, 0
        for batch in task.train:
            patches, _, deep = self.features(batch)
            descriptors.append(patches.reshape(-1, patches.shape[-1]))
            deep_sum = deep.sum(0) if deep_sum is None else deep_sum + deep.sum(0)
            images += batch.shape[0]
        pool = torch.cat(descriptors)
        seed = self.setup.seed * 1000 + task.index
        mode = self.params.continual
        codec = self.banks.codec  # each bank is coded once, from its task's patches (a pq codebook is fit on them)
        if mode == "refit":
            size = self.budget(1, len(pool))
            chosen = pool[greedy_k_center(pool, size, seed=seed, projection_dim=self.params.projection_dim)]
            self.banks.assign_stored([codec.encode(chosen, fit=pool, seed=seed)])
            return
        per_task = self.budget(len(self.banks) + 1, len(pool))
        if per_task < 1:
            raise ValueError(f"bank_size {self.params.bank_size} leaves no room for task {len(self.banks) + 1}")
        if mode == "cl":
            kept = [  # rows picked on the decoded bank, their stored codes kept as they are
                codec.take(
                    self.banks.stored(i),
                    greedy_k_center(bank, per_task, seed=seed + i, projection_dim=self.params.projection_dim),
                )
                for i, bank in enumerate(self.banks)
            ]
        else:  # cl++: the greedy order makes truncation a k-center reduction
            kept = [codec.take(self.banks.stored(i), slice(0, per_task)) for i in range(len(self.banks))]
            self.stored_prototypes.append((deep_sum / images).flatten().unsqueeze(0))
        new = pool[greedy_k_center(pool, per_task, seed=seed, projection_dim=self.params.projection_dim)]
        self.banks.assign_stored([*kept, codec.encode(new, fit=pool, seed=seed)])

    @torch.no_grad()
    def shape_as_fitted(self, tasks: int) -> None:
        """Banks (and CL++ prototypes) of the sizes ``tasks`` tasks leave, each task assumed to have enough patches."""
        if self.params.bank_ratio is not None:
            raise ValueError(
                "patchcore: a bank_ratio bank's size depends on the training images; price it with bank_size instead"
            )
        probe = torch.zeros(1, 3, self.head.image_size, self.head.image_size, device=self.head.blur.kernel.device)
        patches, _, deep = self.features(probe)
        dim = patches.shape[-1]
        codec = self.banks.codec
        if self.params.continual == "refit":
            self.banks.assign_stored([codec.zeros(self.params.bank_size, dim, patches)])
            return
        per_task = self.budget(tasks, self.params.bank_size)
        if per_task < 1:
            raise ValueError(f"bank_size {self.params.bank_size} leaves no room for {tasks} tasks")
        self.banks.assign_stored([codec.zeros(per_task, dim, patches) for _ in range(tasks)])
        if self.params.continual == "cl++":
            self.stored_prototypes.put(self.stored_prototypes.codec.zeros(tasks, deep[0].numel(), deep))

    def route(self, deep: torch.Tensor) -> torch.Tensor:
        """CL++: each image's task [B], its nearest prototype (argmin of |p|^2 - 2 x.p = squared distance - |x|^2)."""
        prototypes = self.stored_prototypes.decoded().flatten(1)
        return torch.addmm(prototypes.square().sum(dim=1), deep.flatten(1), prototypes.T, alpha=-2).argmin(dim=1)

    def score_bank(self, patches: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores [B, P] and reweighted image scores [B] of patches against one bank [M, d]."""
        b, p, d = patches.shape
        bank_norms = bank.square().sum(dim=1)
        dist, index = nearest(patches.reshape(-1, d), bank, bank_norms)
        patch_scores = dist.view(b, p)
        return patch_scores, self.reweighted(patches, patch_scores, index.view(b, p), bank, bank_norms)

    def score_routed(self, patches: torch.Tensor, routes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CL++: each image against its routed task's bank, as ``score_bank`` does.

        The equal-sized banks are stacked and gathered per image, and the distance block is cut
        along the patches (at most ``DISTANCE_BLOCK`` entries per image): no loop that depends on
        the routes or the batch size, so this path exports (``cvad export``) with a free batch size.
        """
        bank = torch.stack(tuple(self.banks)).index_select(0, routes)  # [B, M, d]
        bank_norms = bank.square().sum(dim=2).unsqueeze(1)  # [B, 1, M]
        chunk = max(1, DISTANCE_BLOCK // bank.shape[1])
        scores, index = [], []
        for block in patches.split(chunk, dim=1):
            value, nearest_index = torch.baddbmm(bank_norms, block, bank.transpose(1, 2), alpha=-2).min(dim=2)
            scores.append(value.add_(block.square().sum(dim=2)).clamp_min_(0).sqrt_())
            index.append(nearest_index)
        patch_scores, index = torch.cat(scores, dim=1), torch.cat(index, dim=1)
        return patch_scores, self.reweighted(patches, patch_scores, index, bank, bank_norms)

    def reweighted(
        self,
        patches: torch.Tensor,
        patch_scores: torch.Tensor,
        index: torch.Tensor,
        bank: torch.Tensor,
        bank_norms: torch.Tensor,
    ) -> torch.Tensor:
        """Image scores [B]: the worst patch's score s* reweighted by how isolated its nearest bank entry is.

        ``index`` [B, P] is each patch's nearest entry in ``bank``: one bank [M, d] with ``bank_norms`` |m|^2 [M],
        or one per image [B, M, d] with [B, 1, M].
        """
        rows = torch.arange(patches.shape[0], device=patches.device)
        worst = patch_scores.argmax(dim=1)
        worst_feature = patches[rows, worst]  # m*
        worst_score = patch_scores[rows, worst]  # s*
        k = min(self.params.num_neighbors, bank.shape[-2])
        # N_b(m_hat): the b bank entries closest to m_hat (m_hat itself first, at distance 0), ranked by
        # |m|^2 - 2 m_hat.m (the squared distance less |m_hat|^2, a constant): matmuls, which export.
        if bank.dim() == 2:
            nearest_entry = bank[index[rows, worst]]  # m_hat
            ranking = torch.addmm(bank_norms, nearest_entry, bank.T, alpha=-2)
            support = bank[ranking.topk(k, largest=False).indices]
        else:
            nearest_entry = bank[rows, index[rows, worst]].unsqueeze(1)
            ranking = torch.baddbmm(bank_norms, nearest_entry, bank.transpose(1, 2), alpha=-2).squeeze(1)
            support = bank[rows.unsqueeze(1), ranking.topk(k, largest=False).indices]
        support_dist = (worst_feature.unsqueeze(1) - support).norm(dim=-1)
        weight = 1 - torch.softmax(support_dist, dim=1)[:, 0]
        return weight * worst_score

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.banks:
            raise RuntimeError("PatchCore has not been fitted on any task yet")
        patches, grid, deep = self.features(images)
        mode = self.params.continual
        if mode == "cl++":
            routes = self.route(deep)
            if len({self.banks.rows(i) for i in range(len(self.banks))}) == 1:
                patch_scores, image_scores = self.score_routed(patches, routes)
            else:  # a task with fewer patches than B/T left a smaller bank: score each route's images apart
                patch_scores = patches.new_empty(patches.shape[:2])
                image_scores = patches.new_empty(patches.shape[0])
                for t in routes.unique().tolist():
                    rows = (routes == t).nonzero().flatten()
                    patch_scores[rows], image_scores[rows] = self.score_bank(patches[rows], self.banks[t])
        else:
            scored = [self.score_bank(patches, bank) for bank in self.banks]
            all_images = torch.stack([s[1] for s in scored])  # [K, B]
            routes = all_images.argmin(dim=0)
            image_scores = all_images.gather(0, routes.unsqueeze(0)).squeeze(0)
            patch_scores = torch.stack([s[0] for s in scored])[
                routes, torch.arange(routes.shape[0], device=routes.device)
            ]
        maps = self.head(patch_scores.view(-1, *grid))
        return AnomalyOutput(image_scores, maps, routes if mode != "refit" else None)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        parts = {
            "backbone": list(self.backbone.parameters()) + list(self.backbone.buffers()),
            "memory_bank": self.banks.stored_tensors(),
            "map_head": list(self.head.buffers()),
        }
        if not self.stored_prototypes.empty:
            parts["prototypes"] = self.stored_prototypes.tensors()
        return parts
