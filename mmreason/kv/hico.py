"""HiCo — hierarchical video-token compression (VideoChat-Flash, arXiv 2501.00574), applied to the KV
cache of a prompt whose images are video frames (one `<image>` per sampled frame):

1. Frame level: each frame's token grid is average-pooled to about `tokens_per_frame` entries
   (a g × g grid, g = round(√tokens_per_frame), regions as in adaptive average pooling).
2. Clip level: every `clip_frames` consecutive frames are one clip; their pooled entries are
   averaged cell by cell, so a clip costs what one frame does.
3. Progressive dropping: from decoder layer `drop_from_layer` on, each layer keeps `drop_keep` of
   the previous layer's merged visual entries (drop_keep^(l − start + 1) of them at layer l), the
   ones the prompt's last query attends to most. Text is never dropped.

Merging happens after the prompt, in every layer; keys are merged un-rotated and re-rotated at the
mean position of what they cover (see `mmreason.kv.rope`), and a merged entry's attention logit
gets + log(tokens merged). Tokens of an image that are not on its grid (Phi-4's row separators)
stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmreason.config import ConfigError
from mmreason.kv.base import KV, LayerCall, Press, check_fraction, keep_top
from mmreason.kv.modality import VISION


def pooling_matrix(h: int, w: int, gh: int, gw: int, device: torch.device | None = None) -> torch.Tensor:
    """(gh·gw, h·w) float64 weights of adaptive average pooling from an h × w grid to gh × gw."""
    def axis(n: int, g: int) -> torch.Tensor:
        m = torch.zeros(g, n, dtype=torch.float64, device=device)
        for i in range(g):
            lo, hi = (i * n) // g, -(-(i + 1) * n // g)
            m[i, lo:hi] = 1.0
        return m

    a = torch.einsum("ir,jc->ijrc", axis(h, gh), axis(w, gw)).reshape(gh * gw, h * w)
    return a / a.sum(-1, keepdim=True)


@dataclass
class HicoPress(Press):
    tokens_per_frame: int | None = 16
    """Entries each frame (each grid of it) is pooled to; None = no spatial merge."""
    clip_frames: int = 1
    """Consecutive frames merged into one clip (1 = none)."""
    drop_from_layer: int | None = None
    """First decoder layer that drops merged visual entries (None = no dropping)."""
    drop_keep: float = 0.5
    """Fraction of the previous layer's visual entries each layer from drop_from_layer keeps."""

    def __post_init__(self) -> None:
        if self.tokens_per_frame is not None and self.tokens_per_frame < 1:
            raise ConfigError(f"tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        if self.clip_frames < 1:
            raise ConfigError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.drop_from_layer is not None and self.drop_from_layer < 0:
            raise ConfigError(f"drop_from_layer must be >= 0, got {self.drop_from_layer}")
        check_fraction("drop_keep", self.drop_keep)

    def keeps_everything(self) -> bool:
        no_drop = self.drop_from_layer is None or self.drop_keep == 1.0
        return self.tokens_per_frame is None and self.clip_frames == 1 and no_drop

    def compress(self, call: LayerCall) -> None:
        if not call.prefill:
            return
        if self.tokens_per_frame is not None or self.clip_frames > 1:
            k_pre = call.rope().unrotate(call.keys, call.state.pos)
            rows = [self._merge_row(call, b, k_pre[b], call.values[b]) for b in range(k_pre.shape[0])]
            if any(r is not None for r in rows):
                rows = [r if r is not None else self._as_is(call, b, k_pre[b], call.values[b])
                        for b, r in enumerate(rows)]
                call.replace_rows(rows)
        if self.drop_from_layer is not None and call.layer_idx >= self.drop_from_layer and self.drop_keep < 1:
            st = call.state
            is_vis = st.valid & (st.mod == VISION)
            n_vis = is_vis[:, 0].sum(-1)
            frac = self.drop_keep ** (call.layer_idx - self.drop_from_layer + 1)
            k = torch.clamp(torch.floor(n_vis.float() * frac + 0.5).long(), min=1)
            score = call.attention()[:, :, 0].mean(1)[:, None, :].expand_as(st.valid)
            call.keep((st.valid & ~is_vis) | keep_top(score, k, is_vis))

    @staticmethod
    def _as_is(call: LayerCall, b: int, k_pre: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        st = call.state
        valid = st.valid[b, 0]
        return {"k": k_pre[:, valid], "v": v[:, valid], "col": st.col[b, 0][valid], "pos": st.pos[b, 0][valid],
                "mod": st.mod[b, 0][valid], "mass": torch.ones(int(valid.sum()), device=valid.device),
                "valid": valid[valid]}

    def _merge_row(self, call: LayerCall, b: int, k_pre: torch.Tensor, v: torch.Tensor) -> dict | None:
        st, spec = call.state, call.session.spec
        col, pos, valid = st.col[b, 0], st.pos[b, 0], st.valid[b, 0]
        dev = col.device
        frames = spec.images(call.session.prompt_modality[b])
        merged_idx = torch.zeros_like(valid)
        parts = []
        for c in range(0, len(frames), self.clip_frames):
            clip = frames[c : c + self.clip_frames]
            layouts = [[offsets for offsets in spec.image_grids(length)] for _, length in clip]
            if any(len(lay) != len(layouts[0]) or any(a.shape != bb.shape for a, bb in zip(lay, layouts[0]))
                   for lay in layouts):
                continue  # frames of different layouts are not merged together
            for g, offsets in enumerate(layouts[0]):
                h, w = offsets.shape
                if self.tokens_per_frame is None:
                    gh, gw = h, w
                else:
                    per_grid = max(1, self.tokens_per_frame // len(layouts[0]))
                    side = max(1, round(math.sqrt(per_grid)))
                    gh, gw = min(side, h), min(side, w)
                if gh * gw == h * w and len(clip) == 1:
                    continue
                pool = pooling_matrix(h, w, gh, gw, dev)
                ks, vs, ps, cs = [], [], [], []
                for (start, _), lay in zip(clip, layouts):
                    idx = (start + lay[g]).flatten().to(dev)
                    merged_idx[idx] = True
                    ks.append(torch.einsum("nt,htd->hnd", pool.to(k_pre.dtype), k_pre[:, idx]))
                    vs.append(torch.einsum("nt,htd->hnd", pool.to(v.dtype), v[:, idx]))
                    ps.append(pool @ pos[idx].double())
                    cs.append(torch.stack([col[idx][pool[i] > 0].max() for i in range(pool.shape[0])]))
                n = gh * gw
                # adaptive bins overlap when a side does not divide: a token in two bins counts half
                # in each, so the entries' masses add up to the tokens merged (+log(mass) attention)
                member = (pool > 0).double()
                count = (member / member.sum(0, keepdim=True)).sum(-1) * len(clip)
                parts.append({"k": torch.stack(ks).mean(0), "v": torch.stack(vs).mean(0),
                              "col": torch.stack(cs).amax(0), "pos": torch.stack(ps).mean(0).float(),
                              "mod": torch.full((n,), VISION, dtype=torch.int8, device=dev),
                              "mass": count.float(), "valid": torch.ones(n, dtype=torch.bool, device=dev)})
        if not parts:
            return None
        rest = valid & ~merged_idx
        parts.append({"k": k_pre[:, rest], "v": v[:, rest], "col": col[rest], "pos": pos[rest], "mod": st.mod[b, 0][rest],
                      "mass": torch.ones(int(rest.sum()), device=dev), "valid": valid[rest]})
        out = {key: torch.cat([p[key] for p in parts], dim=-2 if key in KV else -1) for key in parts[-1]}
        order = out["col"].argsort(stable=True)
        return {key: t[:, order] if key in KV else t[order] for key, t in out.items()}
