"""Anole / Chameleon family (`anole-7b`, `tiny-anole`): images are discrete VQ-VAE codes in the token
stream, so the model reads images as tokens and can also *write* them — MVoT's visual thoughts
(arXiv 2501.07542).

Images go through the checkpoint's processor (`ChameleonProcessor`: its image processor resizes the
shortest edge to the VQ-VAE's resolution (LANCZOS), centre-crops a square, and maps pixels to
x · 0.0078 − 1; transformers' PIL backend, `ChameleonImageProcessorPil`, runs it without torchvision).
One image in a sequence is ChameleonProcessor's layout: `<racm3:break>`, N × `<image>`, `<eoss>`,
N = its `image_seq_length` (real: 512 px → 1024 codes).
`embed` replaces the N `<image>` placeholders by the image's VQ codes, mapped to their `IMGIMG…`
vocabulary tokens (`ChameleonModel.get_image_tokens`, the frozen VQ-VAE), and embeds the ids with
the text embedding table. After that only token ids are left of the image, so cached generation
from `inputs_embeds` never needs the pixels again. `image_token_ids(images)` gives the same ids
for step images, which a trainer puts into the labels to teach the model to draw its thoughts;
`visual_token_discrepancy` is MVoT's extra loss on those positions.

The tiny variant: 64 px images (its processor resizes and crops to 64), a VQ-VAE of 32 channels that
downsamples 8× to 8×8 = 64 codes from a codebook of 256, and a 2-layer text model of width 128. Its
vocabulary is the word-level tokenizer plus one `IMGIMG…` token per code (the names Chameleon's
`vocabulary_map` decodes). A fresh tiny VQ-VAE is random; `fit_codebook` (k-means) and
`train_tokenizer` (VQ-VAE training with `TokenizerDecoder`) make it an image tokenizer before a
stage trains the transformer (`model.codebook_rows`, `model.tokenizer_steps`). Replies are decoded
under `ImageSpanRule`: a drawing is exactly `codes_per_image` codes between its markers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch
from PIL import Image
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEEncoderResnetBlock
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple

from mmreason.models.base import Family, as_pil
from mmreason.models.tokenizer import IMAGE

IMAGE_START, IMAGE_END = "<racm3:break>", "<eoss>"
"""Chameleon's begin/end-of-image tokens (ChameleonProcessor's defaults)."""
TINY_CODEBOOK = 256
DRAWN_CODES_KEPT = 200_000
"""Images whose codes `AnoleFamily.drawn_images` keeps (~0.7 kB each: the 8×8 codes of a tiny
image; a 6 400-row visual-thought epoch draws ~45 000)."""


def image_code_token(code: int) -> str:
    """The vocabulary name of VQ code `code`: digits spelled A–J between `IMGIMG` and a final `Z`
    (the inverse of `ChameleonImageVocabularyMapping.bpe2img`)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def tiny_config(tokenizer: Any, image_size: int = 64) -> ChameleonConfig:
    vocab = tokenizer.get_vocab()
    needed = (IMAGE, IMAGE_START, IMAGE_END, image_code_token(TINY_CODEBOOK - 1))
    missing = [name for name in needed if name not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}: build it with AnoleFamily.extra_tokens")
    vq = dict(embed_dim=32, num_embeddings=TINY_CODEBOOK, latent_channels=32, resolution=image_size,
              base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=None)
    return ChameleonConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           vq_config=vq, vocabulary_map=vocab, tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)


def codes_per_image(config: ChameleonConfig) -> int:
    """VQ codes of one image: the VQ-VAE's latent grid, resolution / 2^(levels − 1) per side (one
    stride-2 convolution per level but the last)."""
    vq = config.vq_config
    side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
    return side * side


def build_processor(tokenizer: Any, config: ChameleonConfig) -> ChameleonProcessor:
    """A `ChameleonProcessor` for `config` around `tokenizer`: Chameleon's image preprocessing (its
    class defaults: LANCZOS, ×0.0078, mean 1, std 1) at the VQ-VAE's resolution, one image =
    `codes_per_image` tokens."""
    side = config.vq_config.resolution
    images = ChameleonImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return ChameleonProcessor(images, tokenizer, image_seq_length=codes_per_image(config), image_token=IMAGE)


class AnoleForConditionalGeneration(ChameleonForConditionalGeneration):
    """Chameleon whose logits keep the image tokens.

    `ChameleonForConditionalGeneration.forward` sets every `IMGIMG…` logit to the dtype's minimum
    (the released Chameleon weights were not meant to draw). Anole and MVoT train and sample those
    tokens, and with the mask a label on an image token has a cross-entropy of ~1e38. Same weights,
    same config (`model_type` "chameleon"); set `suppress_image_tokens` to get Chameleon's behaviour
    back, e.g. for a text-only answer.
    """

    suppress_image_tokens: bool = False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if self.suppress_image_tokens:
            logits[:, :, self.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def visual_token_discrepancy(logits: torch.Tensor, labels: torch.Tensor, codebook_embeddings: torch.Tensor,
                             image_token_ids: torch.Tensor) -> torch.Tensor:
    """MVoT's visual-token discrepancy loss (Li et al. 2025, arXiv 2501.07542, Sec. 3.3).

    At every position whose label is an image token: Σ_j p_j · d(e_gt, e_j), where p is the softmax of
    the logits over the image tokens only and d is the mean squared difference between codebook
    embeddings — the expected distance, in the VQ-VAE's own space, between the drawn code and the
    right one. Cross-entropy calls every wrong code equally wrong; this term prefers near misses.

    `logits` (B, T, V) and `labels` (B, T) as the model takes them: labels are *not* shifted
    (logits[:, t] predicts labels[:, t + 1]), -100 is ignored. `codebook_embeddings` (K, D): row k is
    code k; `image_token_ids` (K,): the vocabulary id of code k. Returns the mean over image-token
    positions; 0 (still in the graph) when there are none.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    image_token_ids = image_token_ids.to(labels.device, torch.long)
    code_of = torch.full((max(logits.shape[-1], int(image_token_ids.max()) + 1),), -1, dtype=torch.long,
                         device=labels.device)
    code_of[image_token_ids] = torch.arange(len(image_token_ids), device=labels.device)
    codes = code_of[labels.clamp(min=0)]
    at_image = (labels >= 0) & (codes >= 0)
    if not at_image.any():
        return logits.sum() * 0.0
    probs = logits[at_image][:, image_token_ids].float().softmax(-1)  # (M, K)
    # the codebook is the frozen VQ-VAE's: a yardstick, not something this loss should move
    book = codebook_embeddings.detach().float().to(probs.device)
    truth = book[codes[at_image]]  # (M, D)
    # |a-b|² = |a|² + |b|² − 2a·b: (M, K) distances without an (M, K, D) tensor (K = 8192 for Anole)
    sq_dist = truth.pow(2).sum(-1, keepdim=True) + book.pow(2).sum(-1) - 2.0 * truth @ book.T
    distance = sq_dist.clamp(min=0.0) / book.shape[-1]
    return (probs * distance).sum(-1).mean()


class ImageSpanRule:
    """Interleaved text-and-image decoding as Chameleon and Anole do it (the logits processors of
    Anole's interleaved generation: image tokens only inside an image, a fixed number of them):
    after `<racm3:break>` only VQ code tokens, exactly `codes_per_image` of them, then `<eoss>`;
    outside an image no code token and no `<eoss>`. Without it a small model may leave a drawing
    open (hundreds of codes until the token budget: the row gets no answer, its image is never
    finished, so a press waiting for `<eoss>` never compresses it) or close one early."""

    def __init__(self, batch_size: int, start_id: int, end_id: int, code_ids: torch.Tensor, codes_per_image: int):
        self.start_id, self.end_id, self.n = start_id, end_id, codes_per_image
        self.code_ids = code_ids.long()
        self.count = torch.full((batch_size,), -1, dtype=torch.long)  # codes so far in the open image; -1: none
        self._masks: tuple[torch.Tensor, torch.Tensor] | None = None  # (code, end) over the vocabulary

    def allow(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (B, V) with every token the rule forbids at each row's next place set to the minimum."""
        if self._masks is None or self._masks[0].shape[0] != logits.shape[-1] or self._masks[0].device != logits.device:
            code = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            code[self.code_ids.to(logits.device)] = True
            end = torch.zeros_like(code)
            end[self.end_id] = True
            self._masks = (code, end)  # built once a decode, not every step
        code, end = self._masks
        count = self.count.to(logits.device)[:, None]
        forbid = torch.where(count < 0, code | end, torch.where(count >= self.n, ~end, ~code))
        return logits.masked_fill(forbid, torch.finfo(logits.dtype).min)

    def step(self, tokens: torch.Tensor) -> None:
        """Advance each row's state past the token it took."""
        tokens = tokens.to(self.count.device).long()
        opened = self.count >= 0
        self.count = torch.where(tokens == self.start_id, 0,
                                 torch.where(tokens == self.end_id, -1, torch.where(opened, self.count + 1, -1)))


TOKENIZER_RESTART_EVERY = 100
"""`AnoleFamily.train_tokenizer` moves codes no image picked in this many steps onto fresh latents."""


class TokenizerDecoder(torch.nn.Module):
    """Latents → pixels, the mirror of `ChameleonVQVAEEncoder` (its residual blocks; nearest-neighbour
    upsampling + convolution per level): the half of a VQ-VAE that transformers' Chameleon leaves out.
    Only `AnoleFamily.train_tokenizer` uses it, to train the encoder and codebook; it is not saved."""

    def __init__(self, vq_config: Any):
        super().__init__()
        width = vq_config.base_channels * vq_config.channel_multiplier[-1]
        self.conv_in = torch.nn.Conv2d(vq_config.latent_channels, width, 3, padding=1)
        levels = []
        for level, mult in enumerate(reversed(vq_config.channel_multiplier)):
            out = vq_config.base_channels * mult
            blocks: list[torch.nn.Module] = [ChameleonVQVAEEncoderResnetBlock(vq_config, width, out)]
            if level != len(vq_config.channel_multiplier) - 1:
                blocks += [torch.nn.Upsample(scale_factor=2.0, mode="nearest"), torch.nn.Conv2d(out, out, 3, padding=1)]
            levels.append(torch.nn.Sequential(*blocks))
            width = out
        self.levels = torch.nn.Sequential(*levels)
        self.norm_out = torch.nn.GroupNorm(num_groups=32, num_channels=width, eps=1e-6, affine=True)
        self.conv_out = torch.nn.Conv2d(width, vq_config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden = self.levels(self.conv_in(latents))
        return self.conv_out(torch.nn.functional.silu(self.norm_out(hidden)))


class AnoleFamily(Family):
    name = "anole"
    model_class = AnoleForConditionalGeneration
    model_types = ("chameleon",)
    extra_tokens = (IMAGE_START, IMAGE_END, *(image_code_token(code) for code in range(TINY_CODEBOOK)))

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None):
        super().__init__(model, tokenizer, processor)
        mapping = model.model.vocabulary_mapping
        self.image_token_id = mapping.image_token_id
        if self.image_token_id is None:
            raise ValueError(f"{type(model).__name__}: config.vocabulary_map has no {IMAGE!r} token")
        self.image_start_id, self.image_end_id = self._special_ids(IMAGE_START, IMAGE_END)
        self.codes_per_image = codes_per_image(model.config)
        if processor is None:
            raise ValueError(f"{type(model).__name__}: the anole family needs the checkpoint's processor "
                             f"(processor_config.json, saved by Family.save)")
        if processor.image_seq_length != self.codes_per_image:
            raise ValueError(f"processor image_seq_length {processor.image_seq_length} != the VQ-VAE's "
                             f"{self.codes_per_image} codes per image")
        self.image_processor = processor.image_processor
        crop, side = self.image_processor.crop_size, model.config.vq_config.resolution
        if (crop.height, crop.width) != (side, side):
            raise ValueError(f"processor images are {crop.height}x{crop.width} px but the VQ-VAE takes {side}")
        # row k = vocabulary id of VQ code k (Chameleon's own mapping, the inverse of bpe2img)
        self.code_token_ids = mapping.img2bpe_mapping_tensor.long()
        # Chameleon's VQ-VAE is frozen (MVoT and Anole train only the transformer)
        model.model.vqmodel.requires_grad_(False)
        self._drawn_codes: dict[bytes, list[int]] = {}  # drawn_images' codes by content digest

    def _special_ids(self, *tokens: str) -> list[int]:
        ids = self.tokenizer.convert_tokens_to_ids(list(tokens))
        unknown = [t for t, i in zip(tokens, ids) if i is None or i == self.tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path!r} has no {unknown} token(s)")
        return ids

    def image_run(self, image: Image.Image | None = None) -> list[int]:
        return [self.image_start_id] + [self.image_token_id] * self.codes_per_image + [self.image_end_id]

    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.place({"pixel_values": pixels})

    @torch.no_grad()
    def _codes_as_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vq = self.model.model.vqmodel
        pixels = pixel_values.to(vq.device, vq.dtype)
        return self.model.model.get_image_tokens(pixels).long()

    def image_token_ids(self, images: Iterable[Any]) -> torch.Tensor:
        """(n_images, codes_per_image) vocabulary ids of the images' VQ codes (PIL images or encoded
        bytes, e.g. a row's `step_images`): what goes between `<racm3:break>` and `<eoss>` in ids and labels."""
        images = [as_pil(im) for im in images]
        if not images:
            return torch.empty(0, self.codes_per_image, dtype=torch.long, device=self.model.device)
        return self._codes_as_tokens(self.image_inputs(images)["pixel_values"])

    def drawn_images(self, images: list[Any]) -> list[list[int]]:
        """Each image as the model writes it: `<racm3:break>`, its VQ codes' tokens, `<eoss>`.
        The codes of encoded images (a row's `step_images`) are kept, by content, for the next time
        the row comes round: the VQ-VAE is frozen, so they cannot change while training, and
        encoding a visual-thought row's drawings took ~a quarter of a training step. `fit_codebook`
        forgets them (`DRAWN_CODES_KEPT` at most, then the oldest go first)."""
        keys = [hashlib.blake2b(bytes(im), digest_size=16).digest() if isinstance(im, (bytes, bytearray)) else None
                for im in images]
        todo = [i for i, key in enumerate(keys) if key is None or key not in self._drawn_codes]
        fresh = dict(zip(todo, self.image_token_ids([images[i] for i in todo]).tolist() if todo else []))
        runs = []
        for i, key in enumerate(keys):
            codes = fresh[i] if i in fresh else self._drawn_codes[key]
            if i in fresh and key is not None:
                self._drawn_codes[key] = codes
                if len(self._drawn_codes) > DRAWN_CODES_KEPT:
                    del self._drawn_codes[next(iter(self._drawn_codes))]
            runs.append([self.image_start_id, *codes, self.image_end_id])
        return runs

    def decoding_rule(self, batch_size: int) -> ImageSpanRule:
        """Drawings are decoded as Chameleon decodes images: `ImageSpanRule`."""
        return ImageSpanRule(batch_size, self.image_start_id, self.image_end_id, self.code_token_ids,
                             self.codes_per_image)

    def codebook_embeddings(self) -> torch.Tensor:
        """(K, D) VQ codebook, row k = code k: the space MVoT's discrepancy loss measures distance in."""
        return self.model.model.vqmodel.quantize.embedding.weight

    @torch.no_grad()
    def fit_codebook(self, images: Iterable[Any], iters: int = 25, seed: int = 0, batch: int = 256) -> dict[str, float]:
        """Fit the VQ-VAE's codebook to `images` by k-means (Lloyd's) on its encoder's latents, the
        encoder unchanged. A random codebook (a fresh tiny-anole) maps these drawings to codes that
        barely tell one cell from another — nearest codes of random vectors — while a real Anole's
        VQ-VAE was trained on images; this is the cheapest stand-in for that training: each code
        becomes the mean of the latents nearest to it, so similar patches share a code and different
        ones do not. Returns the fraction of latents' variance the codebook leaves (lower is better)
        before and after, and how many codes are used."""
        vq = self.model.model.vqmodel
        images = list(images)
        latents = torch.cat([
            vq.quant_conv(vq.encoder(self.image_inputs([as_pil(im) for im in images[i : i + batch]])["pixel_values"]
                                     .to(vq.device, vq.dtype))).float()
            for i in range(0, len(images), batch)])
        z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        book = vq.quantize.embedding.weight
        total = float(((z - z.mean(0)) ** 2).sum())

        def residual(centres: torch.Tensor) -> tuple[float, torch.Tensor]:
            nearest = torch.cdist(z, centres).argmin(1)
            return float(((z - centres[nearest]) ** 2).sum()) / total, nearest

        before, _ = residual(book.float())
        g = torch.Generator().manual_seed(seed)
        centres = z[torch.randperm(len(z), generator=g)[: book.shape[0]]].clone()
        for _ in range(iters):
            _, nearest = residual(centres)
            sums = torch.zeros_like(centres).index_add_(0, nearest, z)
            counts = torch.bincount(nearest, minlength=len(centres)).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty code keeps its place
        after, nearest = residual(centres)
        book.copy_(centres.to(book.dtype))
        self._drawn_codes.clear()
        return {"residual_before": before, "residual_after": after, "latents": float(len(z)),
                "codes_used": float(len(torch.unique(nearest)))}

    def train_tokenizer(self, images: Iterable[Any], steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                        log_every: int = 0) -> dict[str, float]:
        """Train the VQ-VAE's encoder and codebook as an image tokenizer on `images` for `steps` steps:
        VQ-VAE training (van den Oord et al. 2017) — pixels → encoder → nearest code → a decoder →
        pixels, mean squared reconstruction error plus the quantizer's codebook and commitment terms,
        gradients passed straight through the code choice — as a real Anole's VQ-VAE was trained
        (Chameleon's, on images). transformers' Chameleon has no decoder (it never draws pixels), so
        the decoder here is `TokenizerDecoder`, used for this training and then dropped; codes that
        no image picked in the last `TOKENIZER_RESTART_EVERY` steps are moved onto latents of the
        current batch (codebook restarts, as in Jukebox and ViT-VQGAN). Call `fit_codebook` first
        (k-means init, as `jobs.train` does) so no code starts dead. Returns the reconstruction MSE
        of the first and last batches and the codes the images use afterwards."""
        vq = self.model.model.vqmodel
        images = [as_pil(im) for im in images]
        pixels = torch.cat([self.image_inputs(images[i : i + 256])["pixel_values"] for i in range(0, len(images), 256)])
        pixels = pixels.to(vq.device, vq.dtype)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        decoder = TokenizerDecoder(vq.config).to(vq.device, vq.dtype)
        parts = [vq.encoder, vq.quant_conv, vq.quantize]
        params = [p for m in parts for p in m.parameters()] + list(decoder.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        vq.train()
        vq.requires_grad_(True)
        book = vq.quantize.embedding.weight
        picked = torch.zeros(book.shape[0], dtype=torch.bool, device=book.device)
        mse_first = mse = float("nan")
        try:
            for step in range(steps):
                x = pixels[torch.randint(len(pixels), (min(batch, len(pixels)),), generator=g)]
                z = vq.quant_conv(vq.encoder(x))
                quant, vq_loss, codes = vq.quantize(z)
                recon = decoder(vq.post_quant_conv(quant))
                rec = torch.nn.functional.mse_loss(recon, x)
                opt.zero_grad(set_to_none=True)
                (rec + vq_loss).backward()
                opt.step()
                mse = rec.item()
                mse_first = mse if step == 0 else mse_first
                picked[codes] = True
                if (step + 1) % TOKENIZER_RESTART_EVERY == 0:
                    dead = (~picked).nonzero().squeeze(1)
                    if len(dead):
                        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                        with torch.no_grad():
                            book[dead] = flat[torch.randint(len(flat), (len(dead),), generator=g)].to(book.dtype)
                    picked.zero_()
                if log_every and (step + 1) % log_every == 0:
                    print(f"tokenizer step {step + 1}/{steps}: reconstruction mse {mse:.4f}", flush=True)
        finally:
            vq.requires_grad_(False)
            vq.eval()
        with torch.no_grad():
            used = torch.unique(torch.cat([self._codes_as_tokens(pixels[i : i + 256])
                                           for i in range(0, len(pixels), 256)]))
        self._drawn_codes.clear()
        return {"mse_first": mse_first, "mse_last": mse, "steps": float(steps), "codes_used": float(len(used))}

    def visual_token_discrepancy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`visual_token_discrepancy` with this model's codebook and code → token mapping."""
        return visual_token_discrepancy(logits, labels, self.codebook_embeddings(), self.code_token_ids)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        if "pixel_values" in batch:
            slots = ids == self.image_token_id
            tokens = self._codes_as_tokens(batch["pixel_values"]).to(ids.device)
            if int(slots.sum()) != tokens.numel():
                raise ValueError(
                    f"batch has {int(slots.sum())} {IMAGE} placeholders but {tokens.shape[0]} images × "
                    f"{tokens.shape[1]} codes; build rows with this family's encode()"
                )
            ids = ids.masked_scatter(slots, tokens)
        return self.model.get_input_embeddings()(ids)


__all__ = ["AnoleFamily", "AnoleForConditionalGeneration", "IMAGE_END", "IMAGE_START", "build_processor",
           "codes_per_image", "image_code_token", "tiny_config", "visual_token_discrepancy"]
