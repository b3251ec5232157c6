"""A tiny random-weight DINOv2 of the real architecture, saved in the official and Hugging Face layouts."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from dinofeat_server.engine.backbone import DinoVisionTransformer, VitConfig
from safetensors.torch import save_file


def tiny_config(registers: int = 0, swiglu: bool = False) -> VitConfig:
    return VitConfig(dim=128, depth=2, mlp_hidden=256, registers=registers, swiglu=swiglu, patch=14, pos_grid=37)


def tiny_model(registers: int = 0, swiglu: bool = False, seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    model = DinoVisionTransformer(tiny_config(registers, swiglu))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0).add_(torch.randn_like(p) * 0.05)
            elif name.endswith("gamma"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.1)
            else:
                p.normal_(0, 0.02 if p.dim() > 1 else 0.01)
        model.pos_embed.normal_(0, 0.5)
    return model.eval()


def hugging_face_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under Hugging Face Dinov2Model names (q, k, v split; layer_scale; embeddings.*)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if not m:
            out[{"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
                 "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
                 "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                 "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}[key]] = value
            continue
        layer, rest = m.groups()
        prefix = f"encoder.layer.{layer}"
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{prefix}.attention.attention.{name}.{kind}"] = part.clone()
        else:
            rest = (rest.replace("attn.proj.", "attention.output.dense.").replace("ls1.gamma", "layer_scale1.lambda1")
                    .replace("ls2.gamma", "layer_scale2.lambda1").replace("mlp.w12.", "mlp.weights_in.")
                    .replace("mlp.w3.", "mlp.weights_out."))
            out[f"{prefix}.{rest}"] = value
    return out


def save_official(model: DinoVisionTransformer, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def save_hugging_face(model: DinoVisionTransformer, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in hugging_face_state(model.state_dict()).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
