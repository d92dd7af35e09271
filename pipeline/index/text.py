"""Text encoders T of RAC's retrieval branch: texts → (B, D) embeddings, one call per batch.

RAC (Long et al., "Retrieval Augmented Classification for Long-Tail Visual Recognition", CVPR 2022, Sec. 3.3 and
Fig. 4; METHODS.md §8) concatenates the texts of a query's k neighbours into one string, truncated at 76 tokens, and
encodes it with CLIP's text tower (63M parameters); bag-of-words GloVe and bag-of-words *random* cached embeddings
(uniform [0, 1), dim 300, one vector per word) also work. No official code exists; the choices here:

* :class:`BagOfWordsEncoder` (``"bow"``): words are ``\\w+`` runs of the lower-cased text (the tokenisation of
  :func:`pipeline.index.encoders.encode_texts`), each with a frozen uniform [0, 1) vector from ``_word_vector`` (a
  stable per-word seed), cached per word; a text keeps its first ``context_length`` = 76 words and is embedded as the
  mean of their vectors (an empty text counts as the one word ``""``). No trainable parameters.
* :class:`OpenClipTextEncoder` (``"open_clip"``): open_clip's text tower and its BPE ``SimpleTokenizer`` (the
  vocabulary ships with the wheel: no download). CLIP has 77 positions: SOT, at most 75 BPE tokens of text, EOT; an
  over-long text is cut at 77 keeping EOT last. The paper's "76 tokens" is read as the 76 positions after SOT (75 text
  tokens + EOT), so ``context_length`` = 76 and :meth:`~OpenClipTextEncoder.truncate` keeps 75 BPE tokens. The
  output is the tower's projected EOT feature, not L2-normalised (a linear layer follows). With ``pretrained`` (a local
  weights file, or a tag where a network exists) the tower is CLIP's and frozen by default; without it the tower is
  randomly initialised (seeded) and trained with the classifier (RAC Fig. 4's setting without pretraining).
  ``pretrained_text=False`` always: open_clip never fetches HF text weights behind our back (ECOSYSTEM.md §7).

Every encoder is an ``nn.Module`` with ``forward(texts: list[str]) -> (B, D)`` float32 on the module's device,
attributes ``dim``, ``context_length``, ``pretrained`` (bool) and ``calls`` (incremented once per forward, so tests can
check that the retrieval branch encodes one batch in one call), and ``truncate(text) -> str`` (what the encoder sees).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.index.encoders import _create_open_clip, _word_vector
from pipeline.registry import Registry

logger = logging.getLogger(__name__)

TEXT_ENCODERS: Registry[nn.Module] = Registry("text encoder")
_WORD = re.compile(r"\w+")


@TEXT_ENCODERS.register("bow")
class BagOfWordsEncoder(nn.Module):
    """Random bag-of-words text embeddings (RAC Fig. 4): the mean of frozen uniform [0, 1) word vectors.

    Args:
        dim: word-vector size D (RAC: 300).
        seed: seed of the word vectors (the same word always gets the same vector for a given seed).
        context_length: words kept per text (RAC: 76); later words have no effect.
    """

    pretrained = False

    def __init__(self, dim: int = 300, seed: int = 0, context_length: int = 76) -> None:
        super().__init__()
        if dim < 1 or context_length < 1:
            raise ValueError(f"BagOfWordsEncoder needs dim >= 1 and context_length >= 1; got {dim}, {context_length}")
        self.dim, self.seed, self.context_length = int(dim), int(seed), int(context_length)
        self.calls = 0
        self._cache: dict[str, np.ndarray] = {}
        # empty buffer: follows .to(device) so the output lands where the rest of the model is
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def _words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())[: self.context_length]

    def truncate(self, text: str) -> str:
        """The part of ``text`` the encoder sees: its first ``context_length`` lower-cased words."""
        return " ".join(self._words(text))

    def _vector(self, word: str) -> np.ndarray:
        vec = self._cache.get(word)
        if vec is None:
            vec = self._cache[word] = _word_vector(word, self.dim, self.seed)  # (D,) float64, uniform [0, 1)
        return vec

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Args: texts, B strings. Returns (B, D) float32."""
        self.calls += 1
        rows = [np.mean([self._vector(w) for w in (self._words(t) or [""])], axis=0) for t in texts]
        out = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), dtype=np.float32)
        return torch.from_numpy(out).to(self._anchor.device)  # (B, D)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, seed={self.seed}, context_length={self.context_length}"


class _ClipText(nn.Module):
    """The text half of a full open_clip model (pretrained path): ``encode_text`` only, image tower dropped."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        clip.visual = nn.Identity()  # encode_text never uses it; frees the image tower's weights
        self.clip = clip

    def forward(self, tokens: Tensor) -> Tensor:
        return self.clip.encode_text(tokens, normalize=False)


@TEXT_ENCODERS.register("open_clip")
class OpenClipTextEncoder(nn.Module):
    """open_clip's text tower (RAC: CLIP ViT-B text transformer, 12 layers, width 512, 8 heads).

    Args:
        model: open_clip model name (its config gives the tower and the tokenizer), e.g. ``ViT-B-32``.
        pretrained: local weights file or tag; None = a randomly initialised tower (seeded by ``seed``).
        seed: seed of the random initialisation (the global RNG is left untouched).
        trainable: whether the tower learns; default ``pretrained is None`` (random towers must be trained, a
            pretrained one stays frozen and in eval mode).
        text_cfg: overrides of the model's ``text_cfg`` (e.g. ``{"width": 32, "layers": 1, "heads": 2}`` for tests);
            random initialisation only.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        seed: int = 0,
        trainable: bool | None = None,
        text_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower

        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {model!r}; valid names: open_clip.list_models()")
        tokenizer = open_clip.get_tokenizer(model)
        if not isinstance(tokenizer, open_clip.SimpleTokenizer):
            raise ValueError(
                f"open_clip model {model!r} uses {type(tokenizer).__name__}; only CLIP BPE "
                f"(SimpleTokenizer) text towers are supported offline"
            )
        if text_cfg and pretrained is not None:
            raise ValueError(f"text_cfg overrides {sorted(text_cfg)} do not fit the pretrained weights {pretrained}")
        self.model_name, self.pretrained = model, pretrained is not None
        self.trainable = (pretrained is None) if trainable is None else bool(trainable)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if pretrained is None:
                tcfg = CLIPTextCfg(**{**cfg["text_cfg"], **(text_cfg or {})})
                quick_gelu = cfg.get("quick_gelu", False)
                self.tower: nn.Module = _build_text_tower(cfg["embed_dim"], tcfg, quick_gelu=quick_gelu)
            else:
                self.tower = _ClipText(_create_open_clip(model, pretrained))
        self.tokenizer = tokenizer
        self.dim = int(cfg["embed_dim"])
        self.max_tokens = int(tokenizer.context_length) - 2  # 75 BPE tokens between SOT and EOT
        self.context_length = self.max_tokens + 1  # 76: the positions after SOT, EOT included
        self.calls = 0
        if not self.trainable:
            self.tower.requires_grad_(False)
            self.tower.eval()
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def train(self, mode: bool = True) -> OpenClipTextEncoder:
        super().train(mode)
        if not self.trainable:
            self.tower.eval()  # a frozen tower never switches to training mode (dropout)
        return self

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """(B, 77) token ids: SOT, BPE tokens cut so that EOT stays last, zero padding."""
        return self.tokenizer(list(texts))

    def truncate(self, text: str) -> str:
        """The part of ``text`` the tower sees: its first 75 BPE tokens, decoded (lower-cased, whitespace cleaned)."""
        return self.tokenizer.decode(self.tokenizer.encode(text)[: self.max_tokens]).strip()

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Args: texts, B strings. Returns (B, D) float32."""
        self.calls += 1
        tokens = self.tokenize(texts).to(self._anchor.device)  # (B, 77)
        return self.tower(tokens).float()  # (B, D)

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, pretrained={self.pretrained}, trainable={self.trainable}, dim={self.dim}"


def create_text_encoder(name: str, /, **kwargs: Any) -> nn.Module:
    """Create a registered text encoder (``bow``, ``open_clip``); an unknown name lists the valid ones."""
    return TEXT_ENCODERS.create(name, **kwargs)
