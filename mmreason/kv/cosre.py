"""CoSRe — cosine-compressed shared–residual factorisation of the KV cache (seed 000; the DCT part
follows Fourier-VLM's low-pass of the vision feature grid and FreqKV's DCT of K/V).

After the prompt, per layer and per image:

1. Blockwise 2-D DCT. The image's cached entries lie on its token grid (h × w, see
   `mmreason.kv.modality`); each `block` × `block` tile (edge-replicated at the border; a grid
   smaller than a block is one smaller block, with `keep_*` scaled to it) is transformed with the
   orthonormal DCT-II, its `keep_h` × `keep_w` lowest frequencies are kept and quantised with
   JPEG-style steps that grow with frequency, Δ(u, v) = base_delta · (1 + u + v) (0 = none;
   the rounding is lossy and saves no bytes — the cache holds the reconstructed entries at the
   model's precision, so `base_delta` is an accuracy knob only), and an inverse DCT of size
   keep_h × keep_w turns them into a keep_h × keep_w tile of new entries (scaled by
   √(keep_h·keep_w)/block so a constant tile stays constant); entries standing only for edge
   padding are dropped. With keep = block and base_delta = 0 this is the identity.
2. Shared slots + residuals (`slots` K > 0). The row's entries (text and the DCT entries; the first
   token, an attention sink, is left alone) are clustered by k-means on [k, v] over all heads into
   K shared slots. Per modality the `residual_text` / `residual_vis` fraction of entries farthest
   from their slot stay as their own entries (the residual evidence); every other entry is folded
   into its slot, and each slot is cached once as the mean of what it absorbed.
3. Decoding (`every` > 0, with slots): each time another `every` tokens have been generated, the
   generated text entries that have left the window of the `recent` latest tokens are folded the same
   way: each goes to its nearest slot, the `residual_*` fraction farthest from theirs stay as
   their own entries, and every slot becomes the mass-weighted mean of itself and what it took
   in. The cache then grows by about `residual_text` of the generated text, not all of it. The
   points are fixed by the count of generated tokens, so a teacher-forced forward in chunks of
   `every` tokens (`mmreason.kv.training`) sees the cache exactly as decoding does.
4. Drawn images (MVoT's visual thoughts, arXiv 2501.07542: Anole writes `<racm3:break>`, the VQ
   codes, `<eoss>` while it reasons). Their tokens stay whole while the image is being written;
   in the forward whose tokens include its end marker (`LayerCall.closed_images`, per row, so rows
   of a batch complete images at different steps), the image's grid — the family's, as for a prompt
   image: 32 × 32 codes for anole-7b, 8 × 8 for tiny-anole — goes through step 1 in every layer,
   and with slots its DCT entries are folded into the nearest slots as in step 3 (the
   `residual_vis` fraction farthest from theirs stay). Every other entry is kept bit for bit. (A
   teacher-forced chunk that runs past an end marker lets its later tokens read the image whole.)

RoPE: cached keys are rotated at their positions, and mixing rotated keys of different positions
is meaningless. Keys are un-rotated with the model's own rotary module at their original
positions, compressed pre-RoPE, and re-rotated at the new entry's position: for a DCT entry the
grid position it stands for (fractional, interpolated between the tokens it covers), for a slot
the mean position of its members. Values carry no position and are compressed directly.

A merged entry stands for several tokens; its attention logit gets + log(count) (proportional
attention, as in ToMe) so it weighs what its tokens weighed together.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mmreason.config import ConfigError
from mmreason.kv.base import KV, LayerCall, LayerState, Press, check_fraction, keep_top, packed
from mmreason.kv.modality import SHARED, TEXT, VISION



@functools.lru_cache(maxsize=64)
def dct_matrix(n: int, device: torch.device | None = None) -> torch.Tensor:
    """(n, n) orthonormal DCT-II: row k = a_k cos(π (2i + 1) k / 2n). Cached: read it, never write it."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    k = i[:, None]
    m = torch.cos(math.pi * (2 * i[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def quant_steps(keep_h: int, keep_w: int, base_delta: float, device: torch.device | None = None) -> torch.Tensor:
    """(keep_h, keep_w) quantisation steps base_delta · (1 + u + v)."""
    u = torch.arange(keep_h, dtype=torch.float64, device=device)[:, None]
    v = torch.arange(keep_w, dtype=torch.float64, device=device)[None, :]
    return base_delta * (1 + u + v)


def _axis(n: int, block: int, keep: int) -> tuple[int, int, int]:
    """Block and kept size along one axis of length n; a grid smaller than a block is one smaller
    block that keeps the same fraction (at least one)."""
    if n >= block:
        return block, keep, -(-n // block)
    return n, max(1, math.ceil(keep * n / block)), 1


def compress_grid(x: torch.Tensor, block: int, keep_h: int, keep_w: int, base_delta: float = 0.0) -> torch.Tensor:
    """(..., h, w, C) grid → (..., H', W', C) low-frequency reconstruction (see module doc, step 1)."""
    h, w = x.shape[-3], x.shape[-2]
    bh, kh, nh = _axis(h, block, keep_h)
    bw, kw, nw = _axis(w, block, keep_w)
    xf = x.double()
    pad_h, pad_w = nh * bh - h, nw * bw - w
    if pad_h or pad_w:  # replicate the last row / column
        xf = torch.cat([xf, xf[..., -1:, :, :].expand(*xf.shape[:-3], pad_h, w, xf.shape[-1])], dim=-3)
        xf = torch.cat([xf, xf[..., :, -1:, :].expand(*xf.shape[:-3], nh * bh, pad_w, xf.shape[-1])], dim=-2)
    lead = xf.shape[:-3]
    tiles = xf.reshape(*lead, nh, bh, nw, bw, xf.shape[-1])
    dh, dw = dct_matrix(bh, x.device), dct_matrix(bw, x.device)
    coef = torch.einsum("ui,...aibjc,vj->...aubvc", dh, tiles, dw)[..., :kh, :, :kw, :]
    if base_delta > 0:
        step = quant_steps(kh, kw, base_delta, x.device)[:, None, :, None]
        coef = torch.round(coef / step) * step
    ih, iw = dct_matrix(kh, x.device), dct_matrix(kw, x.device)
    out = torch.einsum("ui,...aubvc,vj->...aibjc", ih, coef, iw) * math.sqrt(kh * kw / (bh * bw))
    out = out.reshape(*lead, nh * kh, nw * kw, xf.shape[-1])
    # entries that stand for edge padding only are dropped
    return out[..., : -(-h * kh // bh), : -(-w * kw // bw), :].to(x.dtype)


def reduced_coords(h: int, w: int, block: int, keep_h: int, keep_w: int,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fractional (row, col) in the original grid of each entry `compress_grid` makes, and how many
    tokens each stands for."""
    bh, kh, nh = _axis(h, block, keep_h)
    bw, kw, nw = _axis(w, block, keep_w)
    step_h = torch.arange(kh, dtype=torch.float64, device=device)
    step_w = torch.arange(kw, dtype=torch.float64, device=device)
    rows = torch.cat([a * bh + (step_h + 0.5) * bh / kh - 0.5 for a in range(nh)])
    cols = torch.cat([a * bw + (step_w + 0.5) * bw / kw - 0.5 for a in range(nw)])
    rows, cols = rows[: -(-h * kh // bh)], cols[: -(-w * kw // bw)]
    return rows.clamp(0, h - 1), cols.clamp(0, w - 1), (bh * bw) / (kh * kw)


def bilinear(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Values of a (h, w) grid at fractional (rows × cols)."""
    h, w = grid.shape
    r0 = rows.floor().long().clamp(0, h - 1)
    c0 = cols.floor().long().clamp(0, w - 1)
    r1, c1 = (r0 + 1).clamp(max=h - 1), (c0 + 1).clamp(max=w - 1)
    fr, fc = (rows - r0).to(grid.dtype)[:, None], (cols - c0).to(grid.dtype)[None, :]
    g = grid
    top = g[r0][:, c0] * (1 - fc) + g[r0][:, c1] * fc
    bottom = g[r1][:, c0] * (1 - fc) + g[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def kmeans(x: torch.Tensor, k: int, iters: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) → (centroids (k, d), assignment (n,)); deterministic init at evenly spaced points."""
    init = torch.linspace(0, x.shape[0] - 1, k, device=x.device).round().long()
    centroids = x[init].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(-1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, torch.cdist(x, centroids).argmin(-1)


@dataclass
class CosrePress(Press):
    block: int = 4
    """DCT tile size b (tokens per side)."""
    keep_h: int = 2
    """Low frequencies kept per tile, vertically (≤ block)."""
    keep_w: int = 2
    """Low frequencies kept per tile, horizontally (≤ block)."""
    base_delta: float = 0.0
    """Quantisation step of the DC coefficient; step (u, v) = base_delta·(1 + u + v); 0 = none.
    Accuracy only: the rounded coefficients are reconstructed at the cache's precision (no bytes saved)."""
    slots: int = 0
    """K shared slots per layer (0 = no shared–residual factorisation)."""
    residual_text: float = 0.5
    """With slots: fraction of text entries kept as their own (residual) entries."""
    residual_vis: float = 0.5
    """With slots: fraction of image entries kept as their own (residual) entries."""
    proportional: bool = True
    """Add log(tokens merged) to a merged entry's attention logit. (Off, the cache keeps no masses:
    a decode-time fold then weighs a slot as one entry.)"""
    every: int = 0
    """With slots: during decoding, every `every` generated tokens fold those that left the recent
    window into the slots (0 = compress the prompt only)."""
    recent: int = 8
    """With `every`: the latest generated tokens, always kept as their own entries."""

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ConfigError(f"block must be >= 1, got {self.block}")
        for name in ("keep_h", "keep_w"):
            value = getattr(self, name)
            if not 1 <= value <= self.block:
                raise ConfigError(f"{name} must be in [1, block={self.block}], got {value}")
        if self.base_delta < 0:
            raise ConfigError(f"base_delta must be >= 0, got {self.base_delta}")
        if self.slots < 0:
            raise ConfigError(f"slots must be >= 0, got {self.slots}")
        check_fraction("residual_text", self.residual_text)
        check_fraction("residual_vis", self.residual_vis)
        if self.every < 0 or self.recent < 0:
            raise ConfigError(f"every and recent must be >= 0, got every={self.every}, recent={self.recent}")
        if self.every and not self.slots:
            raise ConfigError(f"every={self.every} folds generated tokens into the shared slots: it needs slots > 0")

    def keeps_everything(self) -> bool:
        return self.keep_h == self.block and self.keep_w == self.block and self.base_delta == 0 and self.slots == 0

    def compress(self, call: LayerCall) -> None:
        if not call.prefill:
            closed = call.closed_images()
            if any(closed):
                self._drawn(call, closed)
            if self.every:
                self._compact(call)
            return
        st = call.state
        k_pre = call.rope().unrotate(call.keys, st.pos)
        call.replace_rows([self._row(call, b, k_pre[b], call.values[b]) for b in range(k_pre.shape[0])],
                          proportional=self.proportional)

    def _row(self, call: LayerCall, b: int, k_pre: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """One row's new entries: pre-RoPE keys, values and metadata, each (H, n, ...)."""
        st = call.state
        spec = call.session.spec
        col, pos, valid, mod = st.col[b, 0], st.pos[b, 0], st.valid[b, 0], st.mod[b, 0]
        dev = col.device
        in_grid = torch.zeros_like(valid)
        parts = []
        for start, length in spec.images(call.session.prompt_modality[b]):
            for offsets in spec.image_grids(length):
                idx = (start + offsets).to(col.device)
                if not bool(valid[idx].all()):
                    continue
                in_grid[idx.flatten()] = True
                parts.append(self._grid(k_pre, v, pos, col, idx))
        rest = ~in_grid & valid  # padding needs no entry: the mask hides it anyway
        parts.append({"k": k_pre[:, rest], "v": v[:, rest], "col": col[rest], "pos": pos[rest], "mod": mod[rest],
                      "mass": torch.ones(int(rest.sum()), device=dev), "valid": valid[rest]})
        out = {key: torch.cat([p[key] for p in parts], dim=-2 if key in KV else -1) for key in parts[-1]}
        if self.slots:
            out = self._shared_residual(out)
        order = out["col"].argsort(stable=True)
        return {key: t[:, order] if key in KV else t[order] for key, t in out.items()}

    def _grid(self, k_pre: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, col: torch.Tensor,
              idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Step 1 on one image grid of one row: `idx` (h, w) indices of its entries among the row's
        pre-RoPE keys and values (H, L, D), positions and columns (L,) → its DCT entries."""
        h, w = idx.shape
        dev = col.device
        grid = lambda t: t[:, idx.flatten()].view(t.shape[0], h, w, -1)  # noqa: E731
        kr = compress_grid(grid(k_pre), self.block, self.keep_h, self.keep_w, self.base_delta)
        vr = compress_grid(grid(v), self.block, self.keep_h, self.keep_w, self.base_delta)
        rr, cc, mass = reduced_coords(h, w, self.block, self.keep_h, self.keep_w, dev)
        p = bilinear(pos[idx].double(), rr, cc).flatten()
        near = col[idx][rr.round().long()][:, cc.round().long()].flatten()
        n = p.numel()
        return {"k": kr.reshape(k_pre.shape[0], n, -1), "v": vr.reshape(v.shape[0], n, -1), "col": near,
                "pos": p.float(), "mod": torch.full((n,), VISION, dtype=torch.int8, device=dev),
                "mass": torch.full((n,), float(mass), device=dev), "valid": torch.ones(n, dtype=torch.bool, device=dev)}

    def _drawn(self, call: LayerCall, closed: list[list[torch.Tensor]]) -> None:
        """Step 4 of the module doc: the drawn images this forward completed (`closed`, per row the
        entry indices of each), through the DCT like a prompt image, then into the slots."""
        st = call.state
        spec = call.session.spec
        col, pos, valid, mod = st.col[:, 0], st.pos[:, 0], st.valid[:, 0], st.mod[:, 0]
        mass = st.log_mass[:, 0].exp() if st.log_mass is not None else torch.ones_like(pos)
        rows, spans = [], []
        for b, images in enumerate(closed):
            keep = valid[b].clone()
            parts = []
            if images:  # un-rotate this row only: the other rows' keys stay as they are
                k_pre = call.rope().unrotate(call.keys[b:b + 1], pos[b:b + 1])[0]
                for run in images:
                    spans.append((b, int(col[b, run[0]]), int(col[b, run[-1]])))
                    for offsets in spec.image_grids(run.numel()):
                        idx = run[offsets.to(run.device)]
                        keep[idx.flatten()] = False
                        parts.append(self._grid(k_pre, call.values[b], pos[b], col[b], idx))
            for part in parts:
                part["rotated"] = torch.zeros_like(part["valid"])
            parts.append({"k": call.keys[b][:, keep], "v": call.values[b][:, keep], "col": col[b, keep],
                          "pos": pos[b, keep], "mod": mod[b, keep], "mass": mass[b, keep], "valid": valid[b, keep],
                          "rotated": torch.ones_like(valid[b, keep])})
            rows.append({key: torch.cat([p[key] for p in parts], dim=-2 if key in KV else -1) for key in parts[-1]})
        call.replace_rows(rows, proportional=self.proportional)
        if self.slots:
            st = call.state
            new = torch.zeros_like(st.valid[:, 0])
            for b, lo, hi in spans:
                c = st.col[b, 0]
                new[b] |= (c >= lo) & (c <= hi) & (st.mod[b, 0] == VISION)
            self._fold(call, new & st.valid[:, 0])

    def _shared_residual(self, e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Step 2 of the module doc on one row's entries."""
        valid = e["valid"]
        first = int(valid.nonzero()[0]) if bool(valid.any()) else 0
        member = valid.clone()
        member[first] = False  # the attention sink stays itself
        idx = member.nonzero().flatten()
        k = min(self.slots, idx.numel())
        if k == 0:
            return e
        feats = _features(e["k"][None], e["v"][None], idx[None])[0]
        centroids, assign = kmeans(feats, k)
        distance = (feats - centroids[assign]).norm(dim=-1)
        own = self._residuals(e["mod"][idx][None], e["col"][idx][None], torch.ones_like(idx[None], dtype=torch.bool),
                              distance[None])[0]
        return _into_slots(e, idx[~own], assign[~own], k)

    def _residuals(self, mods: torch.Tensor, cols: torch.Tensor, eligible: torch.Tensor,
                   distance: torch.Tensor) -> torch.Tensor:
        """(B, n) candidates' modalities, columns, whether each is one, and distances to their slots
        → (B, n) which stay their own entries: per row and modality the `residual_*` fraction
        farthest from their slot; of equal distances (a token repeated: the first layer's keys and
        values depend on the token alone) the later one stays."""
        own = torch.zeros_like(eligible)
        for m, frac in ((TEXT, self.residual_text), (VISION, self.residual_vis)):
            sel = eligible & (mods == m)
            n_keep = (frac * sel.sum(-1).double() + 0.5).floor().long()  # as math.floor(frac·n + 0.5)
            own |= keep_top(distance[:, None], n_keep, sel[:, None], cols=-cols[:, None])[:, 0]
        return own

    def _compact(self, call: LayerCall) -> None:
        """Step 3 of the module doc: fold generated entries that left the recent window, every row
        of the batch at once (rows differ only in which entries and slots they hold)."""
        session = call.session
        prompt = session.prompt_modality.shape[1]
        done, before = session.seen - prompt, session.seen - prompt - call.q_len
        hi, lo = (done // self.every) * self.every, (before // self.every) * self.every
        if hi == lo:
            return
        first, last = prompt + max(0, lo - self.recent), prompt + max(0, hi - self.recent)
        st = call.state
        col = st.col[:, 0]
        # image tokens wait for their image to be complete (step 4 folds it then)
        self._fold(call, st.valid[:, 0] & (col >= first) & (col < last) & (st.mod[:, 0] == TEXT))

    def _fold(self, call: LayerCall, fresh: torch.Tensor) -> None:
        """Fold the entries `fresh` (B, L) into each row's nearest slot, but for the `residual_*`
        fraction farthest from theirs, which stay (steps 3 and 4); rows without slots keep them."""
        st = call.state
        valid, col, mod = st.valid[:, 0], st.col[:, 0], st.mod[:, 0]
        slots = valid & (mod == SHARED)
        fresh = fresh & slots.any(-1, keepdim=True)
        if not bool(fresh.any()):
            return
        k_pre = call.rope().unrotate(call.keys, st.pos)
        f_idx, f_ok = packed(fresh)
        s_idx, s_ok = packed(slots)
        distance = torch.cdist(_features(k_pre, call.values, f_idx), _features(k_pre, call.values, s_idx))
        distance, assign = distance.masked_fill(~s_ok[:, None, :], math.inf).min(-1)
        own = self._residuals(mod.gather(1, f_idx), col.gather(1, f_idx), f_ok, distance)
        folded = f_ok & ~own
        # every entry names the entry it goes to: a folded one its nearest slot, any other itself
        target = torch.arange(col.shape[-1], device=col.device).expand_as(col).clone()
        target.scatter_(1, f_idx, torch.where(folded, s_idx.gather(1, assign), f_idx))
        gone = torch.zeros_like(valid).scatter_(1, f_idx, folded)
        mass = st.log_mass[:, 0].exp() if st.log_mass is not None else torch.ones_like(st.pos[:, 0])
        weight = mass * (gone | slots)  # a slot is a member of itself, with its mass
        grown = slots & (torch.zeros_like(weight).scatter_add(1, target, gone.to(weight.dtype)) > 0)
        pool = _pool(target, weight, col.shape[-1], k_pre, call.values, st.pos[:, 0], col)
        at = grown[:, None, :, None]  # slots that took entries in are replaced, the rest stay
        pos = torch.where(grown, pool["pos"], st.pos[:, 0])
        heads = lambda t: t[:, None, :].expand_as(st.valid).contiguous()  # noqa: E731
        log_mass = heads(torch.where(grown, pool["mass"], mass).clamp(min=1e-6).log()) if self.proportional else None
        state = LayerState(col=heads(torch.where(grown, pool["col"], col)), pos=heads(pos), valid=st.valid,
                           mod=st.mod, log_mass=log_mass, extra=st.extra)
        keys = torch.where(at, call.rope().rotate(pool["k"], state.pos), call.keys)
        call.replace(keys.to(call.keys.dtype), torch.where(at, pool["v"], call.values), state)
        call.keep(~gone)


def _features(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, n, H·2D) what entries `idx` (B, n) of keys and values (B, H, L, D) are clustered by:
    [pre-RoPE key, value] over all heads."""
    b, h, _, d = k.shape
    at = idx[:, None, :, None].expand(b, h, idx.shape[1], d)
    kv = torch.cat([k.gather(2, at), v.gather(2, at)], dim=-1)
    return kv.permute(0, 2, 1, 3).reshape(b, idx.shape[1], -1).float()


def _pool(target: torch.Tensor, weight: torch.Tensor, size: int, k: torch.Tensor, v: torch.Tensor,
          pos: torch.Tensor, col: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entries pooled by `target` (B, L) into `size` entries per row, each entry weighing `weight`
    (B, L; 0 = not pooled): per pooled entry its summed weight ("mass", (B, size)), the weighted
    means of the keys and values (B, H, L, D → B, H, size, D) and positions (B, L → B, size) it took
    in, and the latest column it took in. An entry nothing went into has mass 0 and means 0."""
    mass = torch.zeros(*target.shape[:-1], size, dtype=weight.dtype, device=weight.device).scatter_add(-1, target, weight)
    safe = mass.masked_fill(mass == 0, 1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        w = weight.to(t.dtype)[:, None, :, None]
        at = target[:, None, :, None].expand_as(t)
        sums = t.new_zeros(*t.shape[:2], size, t.shape[-1]).scatter_add(2, at, t * w)
        return sums / safe.to(t.dtype)[:, None, :, None]

    pos_sums = torch.zeros_like(mass, dtype=torch.float64).scatter_add(-1, target, pos.double() * weight.double())
    latest = torch.full_like(mass, -1, dtype=col.dtype).scatter_reduce(-1, target, col.masked_fill(weight == 0, -1),
                                                                      "amax")
    return {"mass": mass, "k": mean(k), "v": mean(v), "pos": (pos_sums / safe.double()).to(pos.dtype), "col": latest}


def _into_slots(e: dict[str, torch.Tensor], members: torch.Tensor, target: torch.Tensor,
                k: int) -> dict[str, torch.Tensor]:
    """One row's entries with `members` replaced by `k` slots: slot s is the mass-weighted mean of
    the members with target s (keys, values, position), stands for their summed mass, and is
    visible from the latest of their columns on; a slot with no member is not made."""
    dev = e["valid"].device
    # masses stay float32 (a bf16 one is exact only up to 256 tokens); `_pool` casts them for k and v
    pool = _pool(target[None], e["mass"][members][None].float(), k, e["k"][:, members][None],
                 e["v"][:, members][None], e["pos"][members][None], e["col"][members][None])
    made = pool["mass"][0] > 0
    n = int(made.sum())
    slots = {"k": pool["k"][0][:, made], "v": pool["v"][0][:, made], "col": pool["col"][0][made],
             "pos": pool["pos"][0][made], "mod": torch.full((n,), SHARED, dtype=e["mod"].dtype, device=dev),
             "mass": pool["mass"][0][made], "valid": torch.ones(n, dtype=torch.bool, device=dev)}
    keep = torch.ones_like(e["valid"])
    keep[members] = False
    return {key: torch.cat([t[:, keep] if key in KV else t[keep], slots[key].to(t.dtype)], dim=-2 if key in KV else -1)
            for key, t in e.items()}
