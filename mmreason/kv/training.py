"""Teacher forcing over a compressed cache: the loss a model gets when its KV cache is compressed
the way decoding compresses it — the training half of a press-aware fine-tune (the `cosre` stage).

A press that rewrites the cache (CoSRe's DCT and slots) cannot be expressed as an attention mask
over one forward of the whole row: its entries are new ones, made from the prompt's. So the row is
run as decoding runs it: the prompt in one forward under the press (which compresses it), then the
answer over the compressed cache, in chunks that end where the press acts during decoding (every
`chunk` generated tokens; CoSRe's `every`). Inside a chunk the answer's tokens see each other
causally, as they would one step at a time, and the cache the chunk reads is the one decoding would
hold. Gradients reach the model through both passes and through the press's own arithmetic (means,
DCTs); which entries a press merges or keeps is a discrete choice and passes none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmreason.models.base import IGNORE, position_ids

if TYPE_CHECKING:
    from mmreason.kv.base import Press
    from mmreason.models.base import Family


def prompt_width(batch: dict[str, torch.Tensor]) -> int:
    """The column where every row's answer starts, in a batch collated with `align_latents=True`
    (prompts left-padded to end together): the first column holding any row's first label."""
    labels = batch["labels"]
    has = (labels != IGNORE).any(0)
    if not bool(has.any()):
        raise ValueError("batch has no answer tokens (every label is ignored)")
    width = int(has.float().argmax())
    first = (labels != IGNORE).float().argmax(1)
    rows = (labels != IGNORE).any(1)
    if not bool((first[rows] == width).all()):
        raise ValueError("answers do not start at one column; collate the batch with align_latents=True")
    return width


def compressed_forward(family: "Family", batch: dict[str, torch.Tensor], press: "Press",
                       chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of `batch` with its cache under `press`, as the module doc describes: the
    prompt's forward, then the answer in chunks of `chunk` tokens (0: in one forward)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if bool((ids == family.latent_id).any()):
        raise ValueError("compressed_forward takes cot rows; latent thoughts are not supported")
    model = family.model
    lead = prompt_width(batch)
    pos = position_ids(mask)
    with press(family):
        embeds = family.embed(batch)  # inside: the press reads the token ids (modality) off it
        out = model(inputs_embeds=embeds[:, :lead], attention_mask=mask[:, :lead], position_ids=pos[:, :lead],
                    use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        step = chunk or ids.shape[1]
        for r0 in range(lead, ids.shape[1], step):
            r1 = min(r0 + step, ids.shape[1])
            out = model(inputs_embeds=embeds[:, r0:r1], attention_mask=mask[:, :r1], position_ids=pos[:, r0:r1],
                        past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.past_key_values
    logits = torch.cat(parts, dim=1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
    return loss, logits


def distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions at the answer's positions (those the
    loss reads), averaged over them — KV-Distill's objective: the student reads a compressed cache,
    the teacher the whole one. Logits (B, T, V) of the same batch; labels (B, T)."""
    pick = labels[:, 1:] != IGNORE
    student = logits[:, :-1][pick].float().log_softmax(-1)
    teacher = teacher_logits[:, :-1][pick].float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")
