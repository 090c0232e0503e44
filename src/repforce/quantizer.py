"""The online quantizer that turns pooled encoder features into representation token ids.

docs/DESIGN.md, "Representation targets", restated:

    z   = normalize(pool(features))          # (M, D), M = batch * positions
    s   = z @ C.T / temperature              # (M, K), C: (K, D) unit prototypes
    q   = balance(s)                         # see below
    ids = q.argmax(dim=1)                    # (M,)
    C[k] = normalize(m C[k] + (1 - m) normalize(sum of z with ids == k))   # only k that got features

Balancing (`balance=`):
    "softmax"  (default) the paper's printed step: softmax over prototypes, then softmax
               over positions (dim=0). Since q is in [0, 1], the second softmax is close to
               subtracting each prototype's mean probability before the argmax, which
               penalises prototypes that take mass from everyone.
    "sinkhorn" a proper SwAV Sinkhorn-Knopp step: softmax over prototypes (rows sum to 1),
               then divide each column by its sum (columns sum to M / K); `iters` > 1
               alternates the two normalizations.
    "none"     plain argmax of s; collapses onto few prototypes when features cluster.

Balancing statistics (`stats=`): the column sums of the balancing step span the positions
of one batch ("batch", as printed), or a running mean of them over past batches
("running", decay `stats_decay`, read before this batch is added). With the paper's batch of
thousands of images the two agree; with 32 images of a mostly empty canvas the batch sums
jitter, and the same image gets other ids in another batch (measured on the shapes world:
19% of a probe image's ids changed with its batch). Running statistics make the ids a
function of the image and the quantizer state only, as a SwAV feature queue does.

Initialization (`init=`): "random" unit prototypes, or "data": on the first training batch
every prototype is set to a random feature of that batch, so that all of them start where the
features are. Random unit vectors in a few hundred dimensions are far from every feature; on the
shapes world only ~20 of 256 of them ever win an argmax, and re-seeding dead ones at random
features makes the ids churn (docs/RESULTS.md, "The quantizer on the shapes world").

"kmeans": before the first step the trainer fits the prototypes by spherical k-means to the
features of a few thousand training images (`fit`, codebook.fit_quantizer). With a frozen encoder,
momentum 1 and no balancing (recipe shapes-v3) the ids are then a fixed function of the image
from the first step: measured on the shapes world, the online quantizer of shapes-v2 spreads the
identical empty cells of a held-out set over 153 ids (6.1 bits), so that half of what the rep stage
must predict and the renderer must read is noise (docs/results/findings.md, "Recipe shapes-v3").

Dead prototypes: a prototype that receives no feature for `dead_after` updates is
re-seeded at a random feature of the current batch. Everything here runs in fp32
under no_grad: ids carry no gradient, nothing flows back into the encoder.

Under data parallelism every statistic that spans the batch is summed over ranks
(`runtime.all_sum`): the column sums of the balancing step, the assignment counts
and the per-prototype feature sums of the update, and the re-seeding features are the
same on every rank. So the codebooks never drift apart and the ids equal those of one
process on the global batch.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import runtime

BALANCES = ("softmax", "sinkhorn", "none")
STATS = ("batch", "running")
INITS = ("random", "data", "kmeans")


def pool2x2(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """k x k average pooling of a feature grid, (B, h, w, D) -> (B, h/k, w/k, D) or (B, N, D) -> (B, N/k^2, D).

    A (B, N, D) input is a square raster-order grid; the output keeps raster order.
    """
    flat = x.dim() == 3
    if flat:
        side = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], side, side, x.shape[2])  # (B, h, w, D)
    B, h, w, D = x.shape
    x = x.reshape(B, h // k, k, w // k, k, D).mean(dim=(2, 4))  # (B, h/k, w/k, D)
    return x.reshape(B, (h // k) * (w // k), D) if flat else x  # explicit sizes: B may be 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def column_stat(s: torch.Tensor, balance: str, all_sum=None) -> torch.Tensor:
    """The per-prototype column statistic of the balancing step, as a mean over positions (K,).

    softmax: mean of exp(q); sinkhorn: mean of q (q the softmax of s over prototypes)."""
    q = torch.softmax(s, dim=1)
    x = q.exp() if balance == "softmax" else q
    all_sum = all_sum or _local
    return all_sum(x.sum(dim=0)) / all_sum(x.new_tensor(float(x.shape[0])))


def balance_scores(s: torch.Tensor, balance: str = "softmax", iters: int = 1, all_sum=None,
                   col: torch.Tensor | None = None) -> torch.Tensor:
    """The balancing step applied to scores s (M, K); the argmax over dim 1 gives the ids.

    all_sum sums a tensor over data-parallel ranks, so columns (positions) span the global batch.
    col (K,), if given, replaces the batch's column means (see `column_stat`) in the first step:
    the running statistics of `OnlineQuantizer(stats="running")`."""
    if balance == "none":
        return s
    q = torch.softmax(s, dim=1)  # over prototypes: each position a distribution
    if col is not None:  # one step against the running column means; argmax-equivalent to the batch forms
        return (q.exp() if balance == "softmax" else q) / col.clamp(min=1e-12)
    if balance == "softmax":
        if all_sum is None:
            return torch.softmax(q, dim=0)  # over positions, as printed in the paper
        ex = q.exp()  # q is in [0, 1]: exp needs no max shift
        return ex / all_sum(ex.sum(dim=0))  # the same softmax over the positions of all ranks
    if balance == "sinkhorn":
        all_sum = all_sum or _local
        M, K = float(all_sum(q.new_tensor(q.shape[0]))), q.shape[1]
        for i in range(iters):
            if i > 0:
                q = q / q.sum(dim=1, keepdim=True)  # rows -> 1
            q = q / all_sum(q.sum(dim=0, keepdim=True)) * (M / K)  # columns -> M / K, equal use of every prototype
        return q
    raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")


def assign(z: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.5, balance: str = "softmax",
           iters: int = 1, all_sum=None, col: torch.Tensor | None = None) -> torch.Tensor:
    """Ids (M,) of unit features z (M, D) against unit prototypes (K, D)."""
    s = z @ prototypes.T / temperature  # (M, K) cosine / temperature
    return balance_scores(s, balance, iters, all_sum, col).argmax(dim=1)


def momentum_update(prototypes: torch.Tensor, z: torch.Tensor, ids: torch.Tensor, momentum: float,
                    all_sum=_local) -> torch.Tensor:
    """New prototypes (K, D): normalize(m C + (1 - m) normalize(sum of z assigned to k)) where k got features."""
    K = prototypes.shape[0]
    sums = all_sum(torch.zeros_like(prototypes).index_add_(0, ids, z))  # (K, D), over all ranks
    hit = all_sum(torch.bincount(ids, minlength=K)) > 0  # (K,)
    moved = F.normalize(momentum * prototypes + (1 - momentum) * F.normalize(sums, dim=1), dim=1)
    return torch.where(hit[:, None], moved, prototypes)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a histogram: K for uniform use of K codes, 1 for a single code."""
    p = counts.float() / counts.sum().clamp(min=1e-12)
    return torch.exp(-(p * p.clamp(min=1e-12).log()).sum())


class FeatureCenter(nn.Module):
    """A running mean of the target features, subtracted before any cosine is taken.

    The pre-norm residual stream of a ViT carries a large component shared by every
    token: measured on our shapes-world vlm encoder, raw patch features have a mean
    pairwise cosine of 0.99997, so after L2 normalization every cell looks alike and
    the quantizer's ids carry almost nothing. Subtracting the running mean (as DINO
    centers its teacher) leaves the part that differs between cells (mean cosine 0.04).
    The paper is silent here (its DINOv3 features may not need it); `rep_center` turns
    it off."""

    def __init__(self, dim: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))  # (D,)
        self.register_buffer("ready", torch.zeros(()))  # 1.0 once a batch has set the mean (float: FSDP/DCP-friendly)

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (..., D) minus the running mean, which moves toward the batch mean in training mode."""
        x = feats.float().reshape(-1, feats.shape[-1])  # (M, D)
        if self.training:
            total, count = x.sum(0), torch.tensor(float(x.shape[0]), device=x.device)
            if runtime.world_size() > 1:
                total, count = runtime.all_sum(total), runtime.all_sum(count)
            if count > 0:
                batch_mean = total / count
                self.mean.copy_(torch.where(self.ready > 0, self.momentum * self.mean + (1 - self.momentum) * batch_mean,
                                            batch_mean))
                self.ready.fill_(1.0)
        return (x - self.mean).view(feats.shape)


class OnlineQuantizer(nn.Module):
    """Prototypes and usage counters as buffers (they save in the state_dict); updates only in training mode."""

    def __init__(self, num_codes: int, dim: int, temperature: float = 0.5, momentum: float = 0.99,
                 balance: str = "softmax", sinkhorn_iters: int = 1, dead_after: int = 100, usage_decay: float = 0.99,
                 stats: str = "batch", stats_decay: float = 0.99, init: str = "random"):
        super().__init__()
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        if stats not in STATS:
            raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.stats, self.stats_decay, self.init = stats, stats_decay, init
        self.num_codes, self.temperature, self.momentum = num_codes, temperature, momentum
        self.balance, self.sinkhorn_iters = balance, sinkhorn_iters
        self.dead_after, self.usage_decay = dead_after, usage_decay  # dead_after = 0: never re-seed
        self.register_buffer("prototypes", torch.zeros(num_codes, dim))  # (K, D) unit rows
        self.register_buffer("unused", torch.zeros(num_codes, dtype=torch.long))  # updates since last assignment
        self.register_buffer("usage", torch.zeros(num_codes))  # EMA of assignment frequencies
        self.register_buffer("col", torch.zeros(num_codes))  # running column means of balancing (stats="running"); 0 = unset
        self.register_buffer("seeded", torch.zeros(()))  # 1.0 once init="data" has set the prototypes from features
        self.reset()

    @torch.no_grad()
    def reset(self):
        """Random unit prototypes (docs/DESIGN.md section 5), fresh counters."""
        self.prototypes.copy_(F.normalize(torch.randn_like(self.prototypes), dim=1))
        self.unused.zero_()
        self.usage.fill_(1.0 / self.num_codes)
        self.col.zero_()
        self.seeded.zero_()

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """feats (..., D) -> ids (...) long, and usage stats; updates the prototypes if training."""
        reduce = runtime.all_sum if runtime.world_size() > 1 else None  # statistics over the global batch
        lead, D = feats.shape[:-1], feats.shape[-1]
        with torch.autocast(device_type=feats.device.type, enabled=False):
            z = F.normalize(feats.detach().reshape(-1, D).float(), dim=1)  # (M, D)
            if self.training and self.init == "data" and not bool(self.seeded > 0):
                self._seed(z, torch.ones(self.num_codes, dtype=torch.bool, device=z.device), reduce)
                self.seeded.fill_(1.0)
            s = z @ self.prototypes.T / self.temperature  # (M, K)
            running = self.stats == "running" and self.balance != "none"
            col = self.col if running and bool(self.col.sum() > 0) else None  # the first batch uses its own
            ids = balance_scores(s, self.balance, self.sinkhorn_iters, reduce, col).argmax(dim=1)  # (M,)
            if running and self.training:  # this batch joins the running means after its ids are taken
                now = column_stat(s, self.balance, reduce)
                self.col.copy_(now if col is None else self.stats_decay * self.col + (1 - self.stats_decay) * now)
            counts = torch.bincount(ids, minlength=self.num_codes)  # (K,)
            if reduce is not None:
                counts = reduce(counts)
            stats = {"rep_ppl": perplexity(counts), "rep_used": (counts > 0).sum().float()}
            if self.training:
                stats.update(self._update(z, ids, counts, reduce))
            stats["rep_ppl_ema"] = perplexity(self.usage)
        return ids.view(lead), stats

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, iters: int = 25, seed: int = 0) -> dict[str, float]:
        """Spherical k-means of feats (M, D) into the prototypes (init="kmeans"): k-means++ seeding, then
        `iters` rounds of argmax-cosine assignment and mean direction; an empty cluster is re-seeded at
        the feature its prototype explains worst. Marks the quantizer seeded. Returns the fit's stats."""
        z = F.normalize(feats.detach().reshape(-1, feats.shape[-1]).float(), dim=1)  # (M, D)
        K, M = self.num_codes, z.shape[0]
        if M < K:
            raise ValueError(f"k-means needs at least num_codes={K} features, got {M}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        picks = [int(torch.randint(M, (1,), generator=g))]
        best = 1 - z @ z[picks[0]]  # (M,) cosine distance to the nearest chosen centre
        for _ in range(K - 1):  # k-means++: the next centre with probability ~ distance^2
            w = best.clamp(min=0).pow(2).cpu()
            i = int(torch.multinomial(w, 1, generator=g)) if float(w.sum()) > 0 else int(torch.randint(M, (1,), generator=g))
            picks.append(i)
            best = torch.minimum(best, 1 - z @ z[i])
        c = z[picks].clone()  # (K, D)
        for _ in range(iters):
            sim = z @ c.T  # (M, K)
            ids = sim.argmax(dim=1)
            sums = torch.zeros_like(c).index_add_(0, ids, z)
            counts = torch.bincount(ids, minlength=K)
            empty = counts == 0
            c = torch.where(empty[:, None], c, F.normalize(sums, dim=1))
            if empty.any():
                worst = sim.gather(1, ids[:, None]).squeeze(1).argsort()[:int(empty.sum())]  # least explained features
                c[empty] = z[worst]
        ids = (z @ c.T).argmax(dim=1)
        self.prototypes.copy_(c)
        self.seeded.fill_(1.0)
        counts = torch.bincount(ids, minlength=K)
        return {"features": M, "used": int((counts > 0).sum()), "ppl": float(perplexity(counts)),
                "mean_cos": float((z * c[ids]).sum(1).mean())}

    def _update(self, z, ids, counts, reduce=None) -> dict[str, torch.Tensor]:
        """counts: assignments per prototype over the global batch; reduce: the sum over ranks, or None."""
        if self.momentum < 1:  # momentum 1 holds the codebook exactly (a fitted one, init="kmeans")
            self.prototypes.copy_(momentum_update(self.prototypes, z, ids, self.momentum, reduce or _local))
        self.usage.mul_(self.usage_decay).add_(counts.float() / counts.sum().clamp(min=1), alpha=1 - self.usage_decay)
        self.unused.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_after <= 0:
            return {"rep_dead": torch.zeros(())}
        dead = self.unused >= self.dead_after  # (K,)
        n_dead = int(dead.sum())
        if n_dead:
            self._seed(z, dead, reduce)
            self.unused[dead] = 0
            if bool(self.col.sum() > 0):  # a re-seeded prototype starts at the average column mass, not its
                self.col[dead] = self.col[~dead].mean() if bool((~dead).any()) else self.col[dead]  # stale one
        return {"rep_dead": torch.tensor(float(n_dead))}

    def _seed(self, z, rows, reduce=None):
        """Set the prototypes of the boolean mask rows (K,) to random features of this batch, where data is."""
        n = int(rows.sum())
        if reduce is None:
            pick = torch.randperm(z.shape[0], device=z.device)[:n] if n <= z.shape[0] else \
                torch.randint(z.shape[0], (n,), device=z.device)  # distinct features where the batch allows
            self.prototypes[rows] = z[pick]
        else:  # the features of the first rank that has some, so every rank sets the same rows
            self.prototypes[rows] = runtime.first_nonempty_rows(z, n)
