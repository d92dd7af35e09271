"""Frozen encoders for the retrieval memory: image side (teacher / timm / open_clip) and text side (label texts).

RAC (Long et al., CVPR 2022, METHODS.md §8) uses a frozen ImageNet-21k ViT-B/16 as image encoder E and CLIP's text
tower as T. Where pretrained weights are unavailable (offline), this project uses a teacher it trained itself as E and a
randomly initialised CLIP text tower or random bag-of-words embeddings as T (both in the RAC ablation, Fig. 4).

Every image encoder exposes ``encode(images) -> (B, D)`` on preprocessed float images (B, 3, H, W), ``preprocess(uint8
(B, H, W, 3)) -> (B, 3, H, W)`` (resize to the model's input size and normalise with its mean/std) and ``dim``.
Offline (``HF_HUB_OFFLINE=1``), a pretrained tag without a local file or cached copy fails at once, in one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

ENCODERS: Registry[ImageEncoder] = Registry("encoder")
TEXT_KINDS = ("open_clip", "random_bow")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """A frozen image encoder in eval mode.

    Args:
        model: the network; ``forward_fn(images)`` gives (B, D) features.
        dim: feature dimension D.
        input_size: (H, W) the model expects; None keeps the images' size.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        input_size: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim = int(dim)
        self.input_size = tuple(input_size) if input_size else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ImageEncoder:
        # Frozen encoder: always in eval mode (BN statistics and dropout never change).
        return super().train(False)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images → (B, D) features."""
        feats = self._features(images)
        if feats.ndim > 2:  # token sequence or feature map: keep the first (class) token / global average
            feats = feats[:, 0] if feats.ndim == 3 else feats.flatten(2).mean(-1)
        return feats.float()

    @torch.no_grad()
    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) → normalised float (B, 3, H', W') on the encoder's device."""
        x = torch.as_tensor(np.asarray(images)).to(self.mean.device)
        if x.ndim == 3:  # grayscale (B, H, W) → 3 channels
            x = x.unsqueeze(-1).expand(*x.shape, 3)
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False).clamp_(0, 1)
        return (x - self.mean) / self.std


class _ForwardFeatures(ImageEncoder):
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


@ENCODERS.register("teacher")
def teacher_encoder(
    model_dir: str | os.PathLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: tuple[int, int] | None = None,
    **_: object,
) -> ImageEncoder:
    """A model trained by this pipeline: ``<model_dir>/model.pt`` + ``model.json`` via ``load_network``.

    Args:
        model_dir: e.g. ``data/teachers/<name>``.
        mean: normalisation the teacher was trained with (the dataset's); default: its backbone's timm config.
        std: as ``mean``.
        input_size: (H, W) to resize to; default: the backbone's timm config, else the images' own size.
    """
    from pipeline.models.network import load_network  # lazy: the models package imports much more

    model = load_network(model_dir)
    backbone = getattr(model, "backbone", model)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    dim = getattr(model, "feature_dim", None) or getattr(model, "num_features", None)
    if dim is None:
        raise ValueError(f"teacher encoder: the network from {model_dir} has no feature_dim/num_features attribute")
    size = input_size or (tuple(cfg["input_size"][-2:]) if "input_size" in cfg else None)
    return _ForwardFeatures(
        model, dim, size, mean or cfg.get("mean", IMAGENET_MEAN), std or cfg.get("std", IMAGENET_STD)
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


@ENCODERS.register("timm")
def timm_encoder(
    model: str, checkpoint_file: str | os.PathLike | None = None, pretrained: bool = True, **kwargs: object
) -> ImageEncoder:
    """A timm backbone without its classifier (``num_classes=0``), pretrained from the hub or a local file.

    Args:
        model: timm model name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        checkpoint_file: local weights (``pretrained_cfg_overlay=dict(file=...)``; takes priority over the hub).
        pretrained: load pretrained weights (False gives a random network, for tests only).
        **kwargs: passed to ``timm.create_model``.
    """
    import timm

    if checkpoint_file is not None:
        if not Path(checkpoint_file).exists():
            raise FileNotFoundError(f"timm encoder {model!r}: checkpoint_file {checkpoint_file} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint_file))
        pretrained = True
    if pretrained and checkpoint_file is None and _offline() and not _timm_weights_cached(model):
        # huggingface_hub reads HF_HUB_OFFLINE only when imported; check the cache ourselves to fail at once.
        raise RuntimeError(
            f"timm encoder {model!r}: pretrained weights are offline (HF_HUB_OFFLINE=1) and not cached; "
            f"pass checkpoint_file=/path/to/weights or use the 'teacher' encoder"
        )
    try:
        net = timm.create_model(model, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub errors differ by version; re-raised with the fix
        if pretrained and checkpoint_file is None:
            where = "offline (HF_HUB_OFFLINE=1)" if _offline() else "not downloadable"
            raise RuntimeError(
                f"timm encoder {model!r}: pretrained weights are {where} and not cached; "
                f"pass checkpoint_file=/path/to/weights or use the 'teacher' encoder ({err.__class__.__name__})"
            ) from err
        raise
    cfg = net.pretrained_cfg or {}
    return ImageEncoder(
        _TimmFeatures(net),
        net.num_features,
        tuple(cfg.get("input_size", (3, 224, 224))[-2:]),
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
    )


def _timm_weights_cached(model: str) -> bool:
    """Whether the pretrained weights of a timm model name are in the local HF hub or torch hub cache."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    if cfg is None:
        return True  # unknown tag: let timm raise its own error
    if cfg.file and Path(cfg.file).exists():
        return True
    if cfg.hf_hub_id:
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, name), str) for name in names):
            return True
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)).exists()
    return False


class _TimmFeatures(nn.Module):
    """timm model with num_classes=0: forward() gives pooled (B, D) features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _create_open_clip(model: str, pretrained: str | os.PathLike | None) -> nn.Module:
    import open_clip

    if pretrained is not None and not Path(pretrained).exists() and _offline():
        raise RuntimeError(
            f"open_clip encoder {model!r}: pretrained tag {pretrained!r} cannot be downloaded offline "
            f"(HF_HUB_OFFLINE=1); pass a local weights file as pretrained=/path/to/model.pt"
        )
    if pretrained is None:
        logger.warning("open_clip %s: no pretrained weights given; using a randomly initialised model", model)
    try:
        # pretrained_text=False: never fetch HF text-tower weights behind our back (ECOSYSTEM.md §7).
        return open_clip.create_model(
            model, pretrained=None if pretrained is None else str(pretrained), pretrained_text=False
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"open_clip encoder {model!r}: pretrained {pretrained!r} is not available ({err}); "
            f"pass a local weights file as pretrained=/path/to/model.pt"
        ) from err


class _ClipImage(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


@ENCODERS.register("open_clip")
def open_clip_encoder(model: str, pretrained: str | os.PathLike | None = None, **_: object) -> ImageEncoder:
    """The image tower of an open_clip model.

    Args:
        model: open_clip model name, e.g. ``ViT-B-32``.
        pretrained: a pretrained tag (needs the network) or a local weights file; None = random weights.
    """
    clip = _create_open_clip(model, pretrained)
    cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = getattr(clip.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    dim = (
        clip.text_projection.shape[1] if getattr(clip, "text_projection", None) is not None else clip.visual.output_dim
    )
    return ImageEncoder(
        _ClipImage(clip),
        dim,
        size,
        cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
        cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
    )


def create_encoder(name: str, /, **kwargs: object) -> ImageEncoder:
    """Create a registered image encoder (``teacher``, ``timm``, ``open_clip``); unknown names list the valid ones."""
    return ENCODERS.create(name, **kwargs)


def _word_vector(word: str, dim: int, seed: int) -> np.ndarray:
    # A stable per-word seed (Python's hash() is salted per process).
    digest = hashlib.sha256(f"{seed}:{word}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.random(dim, dtype=np.float64)  # uniform [0, 1), as in the RAC ablation


def encode_texts(
    texts: Sequence[str],
    kind: str = "random_bow",
    dim: int = 300,
    seed: int = 0,
    *,
    model: str = "ViT-B-32",
    pretrained: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Embed label texts.

    Args:
        texts: one string per label (class names).
        kind: ``"random_bow"``: mean of fixed random word vectors (uniform [0, 1), one per lower-cased word, RAC
            Fig. 4);
            ``"open_clip"``: the text tower of ``model`` (unit-norm), from ``pretrained`` (local file) or random.
        dim: embedding size for ``random_bow`` (RAC: 300); ignored by ``open_clip`` (its width decides).
        seed: seed of the random word vectors (and of the random text tower).
        model: open_clip model name.
        pretrained: open_clip weights file or tag; None = a randomly initialised text tower.

    Returns:
        (T, D) float32 embeddings.
    """
    if kind == "random_bow":
        rows = []
        for text in texts:
            words = re.findall(r"\w+", text.lower()) or [""]
            rows.append(np.mean([_word_vector(w, dim, seed) for w in words], axis=0))
        return torch.from_numpy(np.stack(rows).astype(np.float32)) if rows else torch.zeros(0, dim)
    if kind == "open_clip":
        import open_clip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = _create_open_clip(model, pretrained).eval()
        tokens = open_clip.get_tokenizer(model)(list(texts))  # (T, 77), truncated keeping EOT
        with torch.no_grad():
            return clip.encode_text(tokens, normalize=True).float()
    raise ValueError(f"unknown text encoder kind {kind!r}; valid kinds: {', '.join(TEXT_KINDS)}")


def _load_image(root: str | None, path: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(os.path.join(root or "", path)) as img:
        img = img.convert("RGB")
        if size is not None:  # resize here so that images of different sizes can be batched
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(img)


@torch.no_grad()
def encode_images(
    encoder: ImageEncoder,
    *,
    images: np.ndarray | None = None,
    paths: Sequence[str] | None = None,
    root: str | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Encode uint8 images (N, H, W, 3) or image files (paths relative to ``root``) into (N, D) float32 features.

    Args:
        encoder: from :func:`create_encoder`.
        images: in-memory uint8 images.
        paths: image files (used when ``images`` is None).
        root: directory of ``paths``.
        batch_size: images per forward pass.
        device: where the encoder runs.
    """
    if (images is None) == (paths is None):
        raise ValueError("encode_images needs exactly one of images= or paths=")
    encoder = encoder.to(device)
    n = len(images) if images is not None else len(paths)  # type: ignore[arg-type]
    out = np.zeros((n, encoder.dim), dtype=np.float32)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if images is not None:
            batch = images[start:stop]
        else:
            batch = np.stack([_load_image(root, p, encoder.input_size) for p in paths[start:stop]])  # type: ignore[index]
        out[start:stop] = encoder.encode(encoder.preprocess(batch)).cpu().numpy()
        logger.debug("encoded %d/%d images", stop, n)
    return out


def split_features(
    dataset_dir: str | os.PathLike,
    encoder_type: str,
    model: str,
    *,
    checkpoint_file: str | None = None,
    teacher_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Features, labels and ids of the non-empty train / val / test splits of a saved dataset.

    For ``encoder_type="teacher"`` the teacher's ``features.npz`` (train / val / test embeddings under the test
    transform, written by its stage) is reused instead of re-encoding; its labels must match the dataset's. Other
    encoders (``timm``, ``open_clip``) encode the images.

    Args:
        dataset_dir: the dataset stage's output directory.
        encoder_type: ``teacher``, ``timm`` or ``open_clip``.
        model: timm / open_clip model id (ignored for ``teacher``).
        checkpoint_file: local weights (timm ``checkpoint_file``; open_clip file or tag).
        teacher_dir: the teacher's output directory (``teacher`` only).
        batch_size: images per forward pass.
        device: where the encoder runs (default: CUDA when available).

    Returns:
        ``{split: {"features" (N, D), "labels" (N,), "ids" (N,)}}``.
    """
    from pipeline.data.datasets import load_split  # lazy: the data package pulls in torchvision

    splits = {s: load_split(str(dataset_dir), s) for s in ("train", "val", "test")}
    splits = {s: d for s, d in splits.items() if len(d.labels)}
    if encoder_type == "teacher":
        from pipeline.evaluate.predict import load_features

        if teacher_dir is None:
            raise ValueError("split_features: encoder_type='teacher' needs teacher_dir")
        feats = load_features(teacher_dir)
        for s, d in splits.items():
            if s not in feats or not np.array_equal(feats.get(f"{s}_labels"), d.labels):
                raise ValueError(
                    f"{teacher_dir}/features.npz: the {s} split is missing or its labels differ from "
                    f"{dataset_dir}; rerun the teacher stage"
                )
    else:
        kw = {"checkpoint_file": checkpoint_file} if encoder_type == "timm" else {"pretrained": checkpoint_file}
        encoder = create_encoder(encoder_type, model=model, **kw)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        feats = {
            s: encode_images(encoder, images=d.images, paths=d.paths, root=d.root, batch_size=batch_size, device=device)
            for s, d in splits.items()
        }
    return {s: {"features": feats[s], "labels": d.labels, "ids": d.ids} for s, d in splits.items()}
