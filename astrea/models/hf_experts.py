"""Pretrained vision models (transformers, or timm where installed) as Astrea experts.

:class:`VisionExpert` wraps one backbone so that it keeps Astrea's expert contract: images
``[B, 3, S, S]`` in ``[0, 1]`` to tokens ``[B, T_e, D_e]``. It

* normalises the images with the backbone's own mean and std (from its image processor's
  config when one is given) and resizes them to the size the backbone was trained at;
* turns the backbone's output into tokens: ``last_hidden_state`` ``[B, T, D]`` as is, a
  feature map ``[B, C, H, W]`` (``last_hidden_state`` of convolutional models, or one of a
  backbone's ``feature_maps``) flattened row-major to ``[B, H * W, C]``;
* freezes every parameter outside the ``trainable`` name patterns, and keeps them frozen
  when a trainer calls ``requires_grad_(True)`` on the expert (as ``ProgressiveAligner``
  does for the experts of a stage); frozen batch-norm layers stay in eval mode.

:data:`ROLE_MODELS` lists transformers model classes known to work for each role; any
vision model whose output has ``last_hidden_state`` or ``feature_maps`` does.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from astrea.models.experts import EXPERTS

# Per role, transformers classes of vision encoders whose outputs the adapter reads (tested with tiny configs).
ROLE_MODELS = {
    "detection": ("Owlv2VisionModel", "OwlViTVisionModel", "ResNetBackbone (a DETR / RT-DETR backbone)"),
    "segmentation": ("SegformerModel", "SamVisionModel"),
    "classification": ("Dinov2Model", "ViTModel", "ConvNextBackbone"),
    "caption": ("SiglipVisionModel", "CLIPVisionModel", "BlipVisionModel"),
}

# ImageNet statistics: what torchvision-style models expect when no processor says otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _statistics(image_processor, image_mean, image_std) -> tuple[Sequence[float], Sequence[float]]:
    """Mean and std from the explicit arguments, else the image processor (object or dict), else ImageNet."""
    if image_processor is not None:
        get = image_processor.get if isinstance(image_processor, dict) else (
            lambda key: getattr(image_processor, key, None))
        image_mean = get("image_mean") if image_mean is None else image_mean
        image_std = get("image_std") if image_std is None else image_std
    image_mean = IMAGENET_MEAN if image_mean is None else image_mean
    image_std = IMAGENET_STD if image_std is None else image_std
    for name, value in (("image_mean", image_mean), ("image_std", image_std)):
        if len(value) != 3:
            raise ValueError(f"VisionExpert: {name} must hold 3 values (RGB); got {list(value)}")
    if any(s <= 0 for s in image_std):
        raise ValueError(f"VisionExpert: image_std must be positive; got {list(image_std)}")
    return tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std)


def _config_image_size(backbone: nn.Module) -> int | None:
    """The input size a transformers backbone's position embeddings were built for, if it has one."""
    size = getattr(getattr(backbone, "config", None), "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


class VisionExpert(nn.Module):
    """One pretrained vision backbone as an Astrea expert: ``[B, 3, S, S]`` in ``[0, 1]`` to ``[B, T_e, D_e]``.

    Args:
        backbone: a transformers vision model (called as ``backbone(pixel_values=...)``) or, with
            ``call="forward_features"``, a timm model.
        image_processor: the backbone's image processor, or its config as a dict; its
            ``image_mean``/``image_std`` normalise the images. ImageNet statistics otherwise.
        image_mean, image_std: explicit statistics (override the processor's).
        image_size: side the images are resized to before the backbone; defaults to the
            backbone config's ``image_size`` (the resolution it was trained at; a config
            without one: images pass at their own size).
        feature_map: which of a backbone's ``feature_maps`` becomes the tokens (default the last).
        skip_tokens: leading tokens dropped from ``last_hidden_state`` (a class token, registers),
            e.g. so that a segmentation head sees a square grid of patch tokens.
        trainable: ``True`` (all parameters), ``False`` (frozen), or ``fnmatch`` patterns of the
            parameter names that train, e.g. ``["encoder.layer.1.*", "layernorm.*"]``.
        call: ``"transformers"`` or ``"forward_features"`` (timm).
    """

    def __init__(self, backbone: nn.Module, *, image_processor=None, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, image_size: int | None = None, feature_map: int = -1,
                 skip_tokens: int = 0, trainable: bool | Sequence[str] = True, call: str = "transformers"):
        super().__init__()
        if call not in ("transformers", "forward_features"):
            raise ValueError(f"VisionExpert: call must be 'transformers' or 'forward_features'; got {call!r}")
        if skip_tokens < 0:
            raise ValueError(f"VisionExpert: skip_tokens must be >= 0; got {skip_tokens}")
        self.backbone = backbone
        self.call = call
        mean, std = _statistics(image_processor, image_mean, image_std)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_size = image_size if image_size is not None else _config_image_size(backbone)
        self.feature_map, self.skip_tokens = feature_map, skip_tokens
        self.set_trainable(trainable)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, model_class=None, **kwargs) -> "VisionExpert":
        """Loads a transformers checkpoint and its image processor (for the normalisation).

        ``model_class``: the transformers class to load (a class or its name, e.g.
        ``"SiglipVisionModel"`` for the vision tower of a SigLIP checkpoint); ``AutoModel``
        by default. Other keyword arguments go to :class:`VisionExpert`.
        """
        import transformers

        if isinstance(model_class, str):
            model_class = getattr(transformers, model_class)
        backbone = (model_class or transformers.AutoModel).from_pretrained(name_or_path)
        if "image_processor" not in kwargs and "image_mean" not in kwargs:
            try:
                kwargs["image_processor"] = transformers.AutoImageProcessor.from_pretrained(name_or_path)
            except (OSError, ValueError):  # a checkpoint without a processor config: ImageNet statistics
                pass
        return cls(backbone, **kwargs)

    @classmethod
    def from_config(cls, config, *, model_class=None, **kwargs) -> "VisionExpert":
        """A randomly initialised backbone from a transformers config (``AutoModel`` unless
        ``model_class`` is given): small configs build test and demo experts offline."""
        import transformers

        if isinstance(model_class, str):
            model_class = getattr(transformers, model_class)
        backbone = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
        return cls(backbone, **kwargs)

    @classmethod
    def from_timm(cls, name: str, *, pretrained: bool = False, **kwargs) -> "VisionExpert":
        """A timm model (``timm.create_model(name, pretrained=...)``) with its data config's
        mean, std and input size. Needs timm installed."""
        try:
            import timm
        except ImportError as exc:
            raise ImportError("VisionExpert.from_timm needs timm: pip install timm") from exc
        backbone = timm.create_model(name, pretrained=pretrained)
        data = timm.data.resolve_data_config({}, model=backbone)
        kwargs.setdefault("image_mean", data["mean"])
        kwargs.setdefault("image_std", data["std"])
        kwargs.setdefault("image_size", data["input_size"][-1])
        return cls(backbone, call="forward_features", **kwargs)

    def settings(self) -> dict:
        """The arguments that rebuild this expert around its backbone's config
        (:meth:`from_settings`); JSON-serialisable."""
        if self.call != "transformers":
            raise ValueError("VisionExpert.settings: only transformers backbones are rebuilt from a config; "
                             f"this one is called through {self.call!r}")
        names = [name for name, _ in self.backbone.named_parameters()]
        trainable = self.trainable_names
        return {"model_class": type(self.backbone).__name__, "image_mean": self.image_mean.flatten().tolist(),
                "image_std": self.image_std.flatten().tolist(), "image_size": self.image_size,
                "feature_map": self.feature_map, "skip_tokens": self.skip_tokens,
                "trainable": True if len(trainable) == len(names) else (trainable or False)}

    @classmethod
    def from_settings(cls, config, settings: dict) -> "VisionExpert":
        """The expert :meth:`settings` describe, with a randomly initialised backbone from ``config``."""
        settings = dict(settings)
        return cls.from_config(config, model_class=settings.pop("model_class"), **settings)

    # -- trainable stages -----------------------------------------------------------------

    def set_trainable(self, trainable: bool | Sequence[str]) -> None:
        """Which parameters train: ``True``, ``False`` or ``fnmatch`` patterns of parameter names."""
        if isinstance(trainable, str):
            raise TypeError(f"VisionExpert: trainable must be a bool or a list of patterns; got the string "
                            f"{trainable!r} (wrap it in a list)")
        names = [name for name, _ in self.backbone.named_parameters()]
        if isinstance(trainable, bool):
            self._trainable = set(names) if trainable else set()
        else:
            patterns = list(trainable)
            unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unmatched:
                raise ValueError(f"VisionExpert: trainable patterns {unmatched} match no parameter of the backbone "
                                 f"(names look like {names[:3]})")
            self._trainable = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        self.requires_grad_(True)

    @property
    def trainable_names(self) -> list[str]:
        """Names of the backbone parameters that train (the others stay frozen)."""
        return [name for name, _ in self.backbone.named_parameters() if name in self._trainable]

    def requires_grad_(self, requires_grad: bool = True) -> "VisionExpert":
        """Like ``nn.Module.requires_grad_``, but ``True`` switches on only the trainable parameters."""
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(requires_grad and name in self._trainable)
        return self

    def train(self, mode: bool = True) -> "VisionExpert":
        """Frozen batch-norm layers keep their running statistics (eval mode) while the rest trains."""
        super().train(mode)
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                prefix = f"{name}." if name else ""
                if not any(f"{prefix}{p}" in self._trainable for p, _ in module.named_parameters()):
                    module.eval()
        return self

    # -- forward --------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VisionExpert: images must be [B, 3, S, S]; got shape {tuple(images.shape)}")
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.image_size)
        pixels = (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)
        weight = next((p for p in self.backbone.parameters() if p.is_floating_point()), None)
        if weight is not None:  # a backbone loaded in bf16 / fp16 reads images of its own dtype
            pixels = pixels.to(weight.dtype)
        if self.call == "forward_features":
            return self._as_tokens(self.backbone.forward_features(pixels))
        output = self.backbone(pixel_values=pixels)
        if getattr(output, "feature_maps", None) is not None:
            return self._as_tokens(output.feature_maps[self.feature_map])
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise ValueError(f"VisionExpert: the output of {type(self.backbone).__name__} has neither "
                             "last_hidden_state nor feature_maps")
        return self._as_tokens(hidden)

    def _as_tokens(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:  # [B, C, H, W] feature map: row-major tokens
            return features.flatten(2).transpose(1, 2)
        if features.dim() == 3:
            return features[:, self.skip_tokens:]
        raise ValueError(f"VisionExpert: backbone features must be [B, T, D] or [B, C, H, W]; "
                         f"got shape {tuple(features.shape)}")


def pretrained_experts(names: dict[str, str | dict], **common) -> dict[str, VisionExpert]:
    """``{role: checkpoint}`` (or ``{role: {"name_or_path": ..., **VisionExpert kwargs}}``) for
    the four roles of :data:`~astrea.models.experts.EXPERTS`, loaded with
    :meth:`VisionExpert.from_pretrained`; ``common`` keyword arguments apply to every expert."""
    if sorted(names) != sorted(EXPERTS):
        raise ValueError(f"pretrained_experts: names must give {', '.join(EXPERTS)}; got {', '.join(names)}")
    experts = {}
    for role, spec in names.items():
        spec = {"name_or_path": spec} if isinstance(spec, str) else dict(spec)
        experts[role] = VisionExpert.from_pretrained(spec.pop("name_or_path"), **{**common, **spec})
    return experts


def tiny_experts(image_size: int = 32, width: int = 32) -> dict[str, VisionExpert]:
    """Small randomly initialised transformers experts, one model class per role (OWLv2 vision for
    detection, SegFormer for segmentation, DINOv2 for classification, SigLIP vision for
    captioning): the offline stand-ins of :func:`pretrained_experts` for tests and the CPU demo."""
    import transformers

    patch = max(1, image_size // 4)
    vit = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
               image_size=image_size, patch_size=patch)
    segformer = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                             hidden_sizes=[width // 2, width], patch_sizes=[7, 3], strides=[4, 2],
                                             num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    clip_stats = dict(image_mean=(0.4815, 0.4578, 0.4082), image_std=(0.2686, 0.2613, 0.2758))
    return {
        "detection": VisionExpert(transformers.Owlv2VisionModel(transformers.Owlv2VisionConfig(**vit)), **clip_stats),
        "segmentation": VisionExpert(transformers.SegformerModel(segformer), image_size=image_size),
        "classification": VisionExpert(transformers.Dinov2Model(transformers.Dinov2Config(**vit))),
        "caption": VisionExpert(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vit)),
                                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    }
