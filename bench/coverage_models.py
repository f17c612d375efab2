"""The models of ``bench/compact_coverage.py``, built with random weights (never downloaded), and
their inputs. Imported by the bench in fxprune's interpreter and by its Torch-Pruning worker in
the peer's, so both prune the very same model: needs torch, transformers for the Hugging Face
ones, and ``fxprune.examples`` (plain torch) for ResNet-50.

Sizes are the architectures' own for the vision models (ResNet-50, ResNeXt-50 32x4d,
RegNetY-400MF, MobileNetV2, ViT-B/16; torchvision's layouts, written here because no CPU build
of torchvision matches the pinned torch), on 64x64 images: channel units do not depend on the
image size, and the transform is fast enough to run them all. ConvNeXt-V2 is the "nano" size
(depths 2-2-8-2, widths 80-640), both Hugging Face's ``ConvNextV2ForImageClassification`` and
timm's layout written here (whose GRN keeps its epsilon as an attribute); the Hugging Face ViT is ViT-S (384 wide, 6 heads, 12 layers) on
64x64; the language models are 4-layer, 512-wide decoders (8 query heads; 8, 2 and 4 key/value
heads for Llama, Qwen2 and Mistral; Gemma with 2 and head width 64, Phi-3 with 4), vocabulary
2000, sequence 32; T5 is 4+4 layers, 256 wide.
``IMAGE`` and ``SEQ`` are read when a model or input is built: a bench may set them first.
"""
from __future__ import annotations

import torch
from torch import nn

from fxprune.examples import ResNet

IMAGE = 64
SEQ = 32
VOCAB = 2000


# ---------------------------------------------------------------------- vision, torchvision layouts
def resnet50() -> nn.Module:
    return ResNet()


def resnext50_32x4d() -> nn.Module:
    """torchvision's resnext50_32x4d: ResNet-50 with bottlenecks twice as wide, 3x3 in 32 groups."""
    model = ResNet()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            width = block.conv1.out_channels * 2
            block.conv1 = nn.Conv2d(block.conv1.in_channels, width, 1, bias=False)
            block.bn1 = nn.BatchNorm2d(width)
            block.conv2 = nn.Conv2d(width, width, 3, block.conv2.stride, 1, groups=32, bias=False)
            block.bn2 = nn.BatchNorm2d(width)
            block.conv3 = nn.Conv2d(width, block.conv3.out_channels, 1, bias=False)
    return model


def _conv_bn(cin, cout, k, stride=1, groups=1, act: type | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _RegNetBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width=8):
        super().__init__()
        self.proj = _conv_bn(w_in, w_out, 1, stride, act=None) if (w_in != w_out or stride != 1) else None
        self.a, self.b = _conv_bn(w_in, w_out, 1), _conv_bn(w_out, w_out, 3, stride, w_out // group_width)
        self.se, self.c = _SqueezeExcite(w_out, int(round(0.25 * w_in))), _conv_bn(w_out, w_out, 1, act=None)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return torch.relu(shortcut + self.c(self.se(self.b(self.a(x)))))


class RegNetY400MF(nn.Module):
    """torchvision's regnet_y_400mf: depths 1, 3, 6, 6; widths 48, 104, 208, 440; groups of 8; SE."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, 2)
        blocks, w_in = [], 32
        for depth, width in zip((1, 3, 6, 6), (48, 104, 208, 440)):
            for i in range(depth):
                blocks.append(_RegNetBlock(w_in, width, 2 if i == 0 else 1))
                w_in = width
        self.trunk, self.fc = nn.Sequential(*blocks), nn.Linear(440, 1000)

    def forward(self, x):
        return self.fc(self.trunk(self.stem(x)).mean((2, 3)))


class _InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0): inverted residuals, depthwise 3x3, ReLU6."""

    def __init__(self, num_classes=1000):
        super().__init__()
        features, cin = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
            for i in range(n):
                features.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class _EncoderBlock(nn.Module):
    def __init__(self, hidden, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp, hidden), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """torchvision's vit_b_16 (patch 16, 12 layers, 12 heads, width 768, MLP 3072) on ``image``
    pixels: ``nn.MultiheadAttention`` with its packed in-projection."""

    def __init__(self, image=None, patch=16, layers=12, heads=12, hidden=768, mlp=3072, num_classes=1000):
        super().__init__()
        image, self.patch, self.hidden = image or IMAGE, patch, hidden
        self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, hidden) * 0.02)
        self.layers = nn.Sequential(*[_EncoderBlock(hidden, heads, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


class _GlobalResponseNorm(nn.Module):
    """timm's GlobalResponseNorm (channels last): its epsilon is an attribute."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias, self.weight, x * x_n)


class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.act = nn.Linear(dim, 4 * dim), nn.GELU()
        self.grn, self.fc2 = _GlobalResponseNorm(4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        y = self.fc2(self.grn(self.act(self.fc1(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """timm's convnextv2_nano layout (depths 2-2-8-2, widths 80-640): GRN with its epsilon as an
    attribute, which Hugging Face's GRN writes as a constant in its code."""

    def __init__(self, depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), _LayerNorm2d(dims[0], eps=1e-6))
        stages, cin = [], dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            down = [] if i == 0 else [_LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, dim, 2, 2)]
            stages.append(nn.Sequential(*down, *[_ConvNeXtBlock(dim) for _ in range(depth)]))
            cin = dim
        self.stages = nn.Sequential(*stages)
        self.norm, self.fc = nn.LayerNorm(cin, eps=1e-6), nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.stages(self.stem(x)).mean((2, 3))))


# ---------------------------------------------------------------------- Hugging Face, from configs
def convnextv2() -> nn.Module:
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification
    return ConvNextV2ForImageClassification(ConvNextV2Config(
        depths=[2, 2, 8, 2], hidden_sizes=[80, 160, 320, 640], num_labels=1000, image_size=IMAGE))


def vit_hf() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        image_size=IMAGE, patch_size=16, num_labels=1000))


def _decoder(config_name: str, model_name: str, kv_heads: int, **extra):
    def build() -> nn.Module:
        import transformers
        config = getattr(transformers, config_name)(
            vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=256,
            tie_word_embeddings=False, use_cache=False, **extra)
        return getattr(transformers, model_name)(config)
    return build


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=4,
        num_heads=8, tie_word_embeddings=False, use_cache=False))


def image_inputs(seed: int) -> tuple:
    return (torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)),)


def token_inputs(seed: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(seed))}


def seq2seq_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (1, SEQ), generator=g),
            "decoder_input_ids": torch.randint(0, VOCAB, (1, SEQ // 2), generator=g)}


# name -> (builder, inputs(seed), family); the family tells the peer how to set up heads
MODELS = {
    "resnet50": (resnet50, image_inputs, "cnn"),
    "mobilenet_v2": (MobileNetV2, image_inputs, "cnn"),
    "resnext50_32x4d": (resnext50_32x4d, image_inputs, "cnn"),
    "regnet_y_400mf": (RegNetY400MF, image_inputs, "cnn"),
    "convnextv2": (convnextv2, image_inputs, "cnn"),
    "convnextv2_timm": (ConvNeXtV2, image_inputs, "cnn"),
    "vit_b_16": (VisionTransformer, image_inputs, "mha"),
    "vit_hf": (vit_hf, image_inputs, "vit_hf"),
    "llama": (_decoder("LlamaConfig", "LlamaForCausalLM", 8), token_inputs, "decoder"),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM", 2), token_inputs, "decoder"),
    "mistral": (_decoder("MistralConfig", "MistralForCausalLM", 4), token_inputs, "decoder"),
    "t5": (t5, seq2seq_inputs, "t5"),
    # Gemma: norms multiply by 1 + weight, embeddings scaled by sqrt(hidden_size) (head_dim 64, not
    # Gemma's default 256); Phi-3: packed qkv_proj cut at offsets, packed gate_up_proj
    "gemma": (_decoder("GemmaConfig", "GemmaForCausalLM", 2, head_dim=64), token_inputs, "decoder"),
    "phi3": (_decoder("Phi3Config", "Phi3ForCausalLM", 4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
             token_inputs, "decoder"),
}


def build(name: str) -> tuple[nn.Module, object]:
    """The model (eval mode, weights from seed 0, trained-looking BatchNorm statistics) and its
    example inputs (seed 0); fresh inputs come from ``MODELS[name][1](seed)``."""
    builder, inputs, _ = MODELS[name]
    torch.manual_seed(0)
    model = builder().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorm at init is the identity: give it spread so scores differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model, inputs(0)
