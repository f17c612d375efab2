"""The channel-analysis rules, one tiny graph per op: which output channels of the producing layer
form one class (are removed together), which tensors they bind, and what blocks them (with the
op named in the reason). Table-driven: one row per rule."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.compaction import RULES, Chan, ChannelAnalysis, keep, register_rule
from fxprune.passes import CAPTURE_PASSES, PassManager
from fxprune.transform import _context


def analyse(model, *inputs) -> ChannelAnalysis:
    ctx = _context(model.eval(), None, inputs, inplace=True)
    PassManager([p() for p in CAPTURE_PASSES]).run(ctx)
    return ChannelAnalysis(ctx.graph_module, ctx.param_of_node, ctx.model).run()


def roots(an, fqn, dim=0) -> np.ndarray:
    return an.roots(an.axes[(fqn, dim)].atoms)


def blocked(an, fqn, dim=0) -> set[str]:
    b = an.blocked_roots()
    return {b[r] for r in roots(an, fqn, dim).tolist() if r in b}


class Linear(nn.Module):
    """fc (8 -> 16) is the producer, ``op`` the op under test, head (16 -> 4) the consumer."""

    def __init__(self, op, head_in=16, extra=False):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 16)
        self.p = nn.Parameter(torch.rand(16) + 0.5)
        self.register_buffer("empty", torch.zeros(0), persistent=False)
        self.head = nn.Linear(head_in, 4)
        self.rms = nn.RMSNorm(16, eps=1e-5)
        self.eps = 1e-5
        self.op = op

    def forward(self, x):
        return self.head(self.op(self, self.fc(x), x))


class Conv(nn.Module):
    """conv (3 -> 8 channels) is the producer, ``op`` the op under test, then a 1x1 conv and a head."""

    def __init__(self, op, mid=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.mid = mid
        self.out = nn.Conv2d(8, 4, 1)
        self.g = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.eps = 1e-3
        self.op = op

    def forward(self, x):
        return self.out(self.op(self, self.conv(x))).mean((2, 3))


def as_heads(h):
    return h.view(2, 4, 4)


def heads_back(h):
    return h.reshape(2, 16)


def rope(q):
    """Hugging Face's rotate-half RoPE on the head dim: q * cos + rotate_half(q) * sin."""
    cos, sin = torch.arange(4.0).cos(), torch.arange(4.0).sin()
    return q * cos + torch.cat([-q[..., 2:], q[..., :2]], -1) * sin


X = torch.randn(2, 8)
IMG = torch.randn(2, 3, 6, 6)

# (id, model, input, producer param, expected classes among its channels, blocked reason substring or None)
CASES = [
    ("relu", Linear(lambda m, h, x: torch.relu(h)), X, "fc.weight", 16, None),
    ("gelu", Linear(lambda m, h, x: F.gelu(h)), X, "fc.weight", 16, None),
    ("sigmoid", Linear(lambda m, h, x: torch.sigmoid(h)), X, "fc.weight", 16,
     "sigmoid (sigmoid) makes pruned channels nonzero before linear (head)"),
    ("clamp", Linear(lambda m, h, x: h.clamp(min=0.1)), X, "fc.weight", 16, "clamp"),
    ("add: residual couples", Linear(lambda m, h, x: h + m.fc2(x)), X, "fc.weight", 16, None),
    ("mul by a parameter", Linear(lambda m, h, x: h * m.p), X, "fc.weight", 16, None),
    ("div by channels", Linear(lambda m, h, x: h / (m.fc2(x).abs() + 1)), X, "fc.weight", 16,
     "divides by pruned channels"),
    ("layer_norm", Linear(lambda m, h, x: F.layer_norm(h, (16,))), X, "fc.weight", 16,
     "normalizes over the channel dim"),
    ("softmax", Linear(lambda m, h, x: torch.softmax(h, -1)), X, "fc.weight", 16, "normalizes over the channel dim"),
    ("mean over channels", Linear(lambda m, h, x: h - h.mean(-1, keepdim=True)), X, "fc.weight", 16,
     "reduces over the channel dim"),
    ("vector norm over the channels", Linear(lambda m, h, x: h / (h.norm(dim=-1, keepdim=True) + 1)), X,
     "fc.weight", 16, None),
    ("vector norm per channel", Conv(lambda m, c: c * torch.linalg.vector_norm(c, 1, dim=(2, 3), keepdim=True)),
     IMG, "conv.weight", 8, None),
    ("matrix norm per channel", Conv(lambda m, c: c * torch.linalg.matrix_norm(c, keepdim=True)), IMG,
     "conv.weight", 8, None),
    ("nuclear norm per channel", Conv(lambda m, c: c * torch.linalg.matrix_norm(c, "nuc", keepdim=True)), IMG,
     "conv.weight", 8, None),
    ("norm of a negative order over the channels",
     Linear(lambda m, h, x: h * torch.linalg.vector_norm(h, -1, dim=-1, keepdim=True)), X, "fc.weight", 16,
     "a norm of order -1 over the channel dim changes when zero channels are removed"),
    ("norm of nonzero channels", Linear(lambda m, h, x: h / torch.sigmoid(h).norm(dim=-1, keepdim=True)), X,
     "fc.weight", 16, "sigmoid (sigmoid) makes pruned channels nonzero before linalg_vector_norm"),
    ("GRN: mean of the norms over the channels, epsilon an attribute",
     Conv(lambda m, c: m.g * c * (lambda g: g / (g.mean(1, keepdim=True) + m.eps))(
         c.norm(dim=(2, 3), keepdim=True))), IMG, "conv.weight", 8, None),
    ("GRN: epsilon a constant in the code",
     Conv(lambda m, c: c * (lambda g: g / (g.mean(1, keepdim=True) + 1e-6))(c.norm(dim=(2, 3), keepdim=True))),
     IMG, "conv.weight", 8, "its epsilon 1e-06 (add (add)) is a constant in the code"),
    ("addcmul: a parameter plus a product", Linear(lambda m, h, x: torch.addcmul(m.p, h, m.fc2(x))), X,
     "fc.weight", 16, None),
    ("rms_norm (nn.RMSNorm)", Linear(lambda m, h, x: m.rms(h)), X, "fc.weight", 16, None),
    ("RMSNorm decomposed", Linear(lambda m, h, x: m.p * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps))),
     X, "fc.weight", 16, None),
    ("RMSNorm decomposed, statistic used twice",
     Linear(lambda m, h, x: (lambda s: m.p * h * s + s)(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps))),
     X, "fc.weight", 16, "its result is used by 2 ops"),
    ("slice of channels", Linear(lambda m, h, x: h[:, :8], head_in=8), X, "fc.weight", 16, "indexes the channel dim"),
    ("view into heads", Linear(lambda m, h, x: torch.relu(h.view(2, 4, 4)).reshape(2, 16)), X, "fc.weight", 4, None),
    ("cat along channels", Linear(lambda m, h, x: torch.cat([h, m.fc2(x)], -1), head_in=32), X, "fc.weight", 16, None),
    ("stack couples", Linear(lambda m, h, x: torch.stack([h, m.fc2(x)]).sum(0)), X, "fc.weight", 16, None),
    ("split evenly couples pieces", Linear(lambda m, h, x: sum(h.split(8, -1)), head_in=8), X, "fc.weight", 8, None),
    ("split unevenly", Linear(lambda m, h, x: h.split([4, 12], -1)[1], head_in=12), X, "fc.weight", 16,
     "splits the channels unevenly"),
    ("unknown op", Linear(lambda m, h, x: torch.cumsum(h, -1)), X, "fc.weight", 16,
     "cumsum (cumsum): not understood by the channel analysis"),
    ("transpose", Linear(lambda m, h, x: h.unsqueeze(1).transpose(1, 2).squeeze(2)), X, "fc.weight", 16, None),
    ("batch_norm", Conv(lambda m, c: m.mid(c), nn.BatchNorm2d(8)), IMG, "conv.weight", 8, None),
    ("group_norm: whole groups", Conv(lambda m, c: m.mid(c), nn.GroupNorm(4, 8)), IMG, "conv.weight", 4, None),
    ("depthwise conv follows", Conv(lambda m, c: m.mid(c), nn.Conv2d(8, 8, 3, padding=1, groups=8)), IMG,
     "conv.weight", 8, None),
    ("grouped conv: whole groups", Conv(lambda m, c: m.mid(c), nn.Conv2d(8, 8, 3, padding=1, groups=2)), IMG,
     "conv.weight", 2, None),
    ("max_pool2d", Conv(lambda m, c: F.max_pool2d(c, 2)), IMG, "conv.weight", 8, None),
    ("adaptive_avg_pool2d", Conv(lambda m, c: F.adaptive_avg_pool2d(c, 2)), IMG, "conv.weight", 8, None),
    ("interpolate", Conv(lambda m, c: F.interpolate(c, scale_factor=2.0)), IMG, "conv.weight", 8, None),
    ("pad with a nonzero value", Conv(lambda m, c: F.pad(c, (1, 1, 1, 1), value=1.0)), IMG, "conv.weight", 8,
     "pad (pad) makes pruned channels nonzero before conv2d (out)"),
    ("channel reaches the output", Conv(lambda m, c: c), IMG, "out.weight", 4, "reaches the model output"),
    # heads: (2, 4 heads, 4) views of the 16 channels, a unit is a head
    ("rotate-half on whole heads", Linear(lambda m, h, x: heads_back(rope(as_heads(h)))), X, "fc.weight", 4, None),
    ("mul by a tensor along the head dim", Linear(lambda m, h, x: heads_back(as_heads(h) * torch.arange(4.0))), X,
     "fc.weight", 4, None),
    ("mul by a tensor along every channel dim", Linear(lambda m, h, x: heads_back(as_heads(h) * torch.rand(4, 4))),
     X, "fc.weight", 4, "combines the channels with"),
    ("select a packed piece", Linear(lambda m, h, x: h.view(2, 2, -1, 4)[:, 1].reshape(2, 8), head_in=8), X,
     "fc.weight", 2, None),
    ("unbind a packed projection", Linear(lambda m, h, x: sum(h.view(2, 2, -1, 4).unbind(1)).reshape(2, 8), head_in=8),
     X, "fc.weight", 2, None),
    ("repeat_kv: expand and merge into heads", Linear(lambda m, h, x: h.view(2, 4, 1, 4).expand(2, 4, 2, 4).reshape(2, 32),
     head_in=32), X, "fc.weight", 4, None),
    ("where with a condition on other dims", Linear(lambda m, h, x: torch.where(x[:, :1] > 0, h, 0.0)), X,
     "fc.weight", 16, None),
    ("RMS norm over the head dim", Linear(lambda m, h, x: heads_back(as_heads(h) * torch.rsqrt(
        as_heads(h).pow(2).mean(-1, keepdim=True) + 1e-6))), X, "fc.weight", 4, None),
    ("divided by a per-head norm", Linear(lambda m, h, x: heads_back(as_heads(h) / (
        as_heads(h).pow(2).mean(-1, keepdim=True) + 1e-6))), X, "fc.weight", 4, "divides by pruned channels"),
    ("where with a nonzero other branch", Linear(lambda m, h, x: torch.where(x[:, :1] > 0, h, 1.0)), X, "fc.weight",
     16, "where (where) makes pruned channels nonzero before linear (head)"),
    ("where with a condition along the channels", Linear(lambda m, h, x: torch.where(x.repeat(1, 2) > 0, h, 0.0)), X,
     "fc.weight", 16, "selects along the channel dim"),
    ("cat with an empty cache", Linear(lambda m, h, x: torch.cat([m.empty, h.view(2, 4, 4)], 0).reshape(2, 16)), X,
     "fc.weight", 4, None),
]


@pytest.mark.parametrize("model,inputs,param,classes,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(model, inputs, param, classes, reason):
    an = analyse(model, inputs)
    assert len(np.unique(roots(an, param))) == classes
    why = blocked(an, param)
    if reason is None:
        assert why == set()
    else:
        assert why and all(reason in w for w in why), why


def test_norms_over_the_channels_record_their_fold():
    an = analyse(Linear(lambda m, h, x: m.rms(h)), X)
    (fold,) = an.scale_folds
    assert (fold.module, fold.scale, fold.power, fold.eps_attr, fold.eps) == ("rms", "rms.weight", 0.5, "eps", 1e-5)
    assert np.array_equal(an.roots(fold.atoms), roots(an, "fc.weight"))
    assert np.array_equal(roots(an, "rms.weight"), roots(an, "fc.weight"))
    an = analyse(Conv(lambda m, c: m.g * c * (lambda g: g / (g.mean(1, keepdim=True) + m.eps))(
        c.norm(dim=(2, 3), keepdim=True))), IMG)
    (fold,) = an.scale_folds  # GRN: g / (mean + eps) is the statistic to the power -1
    assert (fold.scale, fold.power, fold.eps_attr, fold.eps_power) == ("out.weight", 1.0, "eps", 1.0)  # the first weight it reaches


def test_embedding_columns_are_the_hidden_channels():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, i):
            h = self.emb(i)
            return self.head(h + self.fc(h))

    an = analyse(Embed(), torch.randint(0, 10, (2, 3)))
    assert np.array_equal(roots(an, "emb.weight", 1), roots(an, "fc.weight"))
    assert an.axes[("emb.weight", 1)].roles == {"zero"} and blocked(an, "fc.weight") == set()


def test_residual_add_and_stack_couple_both_producers_channel_by_channel():
    for op in (lambda m, h, x: h + m.fc2(x), lambda m, h, x: torch.stack([h, m.fc2(x)]).sum(0)):
        an = analyse(Linear(op), X)
        assert np.array_equal(roots(an, "fc.weight"), roots(an, "fc2.weight"))
        assert np.array_equal(roots(an, "fc.bias"), roots(an, "fc.weight"))          # bias bound (zero role)
        assert np.array_equal(roots(an, "head.weight", 1), roots(an, "fc.weight"))   # consumer input slice


def test_cat_offsets_and_parameter_binding():
    an = analyse(Linear(lambda m, h, x: torch.cat([h, m.fc2(x)], -1), head_in=32), X)
    head_in = roots(an, "head.weight", 1)
    assert np.array_equal(head_in[:16], roots(an, "fc.weight")) and np.array_equal(head_in[16:], roots(an, "fc2.weight"))
    an = analyse(Linear(lambda m, h, x: h * m.p), X)
    assert np.array_equal(roots(an, "p"), roots(an, "fc.weight")) and an.axes[("p", 0)].roles == {"slice"}


def test_norm_and_depthwise_bind_their_tensors():
    an = analyse(Conv(lambda m, c: m.mid(c), nn.BatchNorm2d(8)), IMG)
    for name in ("mid.weight", "mid.bias", "mid.running_mean", "mid.running_var"):
        assert np.array_equal(roots(an, name), roots(an, "conv.weight")), name
    an = analyse(Conv(lambda m, c: m.mid(c), nn.Conv2d(8, 8, 3, padding=1, groups=8)), IMG)
    assert np.array_equal(roots(an, "mid.weight"), roots(an, "conv.weight"))
    an = analyse(Conv(lambda m, c: m.mid(c), nn.GroupNorm(4, 8)), IMG)
    assert len(an.norm_groups) == 1 and an.norm_groups[0].num_groups == 4


def test_grouped_conv_couples_each_group_inputs_with_outputs():
    # 8 -> 12 channels in 4 groups: group g reads input channels 2g, 2g+1 and writes 3g..3g+2
    model = Conv(lambda m, c: m.mid(c), nn.Conv2d(8, 12, 3, padding=1, groups=4))
    model.out = nn.Conv2d(12, 4, 1)
    an = analyse(model, IMG)
    producer, grouped = roots(an, "conv.weight"), roots(an, "mid.weight")
    assert np.array_equal(grouped, np.repeat(producer[::2], 3))
    assert np.array_equal(producer, np.repeat(producer[::2], 2)) and len(np.unique(producer)) == 4
    assert ("mid.weight", 1) not in an.axes        # the in-group dim keeps its size: never cut
    assert blocked(an, "conv.weight") == set()
    (conv,) = an.conv_groups
    assert conv.module == "mid" and conv.num_groups == 4 and conv.atoms.shape == (4, 2 + 3)


def test_grouped_conv_on_the_model_input_is_blocked():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    an = analyse(model, torch.randn(2, 4, 6, 6))
    assert blocked(an, "0.weight") == {
        "conv2d (0): grouped (groups=2) convolution whose input channels cannot be removed"}
    assert an.conv_groups == []


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        def heads(t):
            return t.view(2, 5, 2, 8).transpose(1, 2)
        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(2, 5, 16)).sum(1)


def test_attention_heads_go_whole_with_q_k_v():
    an = analyse(Attention(), torch.randn(2, 5, 16))
    q = roots(an, "q.weight")
    assert len(np.unique(q)) == 2 and blocked(an, "q.weight") == set()
    assert np.array_equal(q, roots(an, "k.weight")) and np.array_equal(q, roots(an, "v.weight"))


class GroupedQueryAttention(nn.Module):
    """4 query heads, 2 key/value heads of 4 channels (``enable_gqa``), a per-head bias table."""

    def __init__(self, bias_table=False):
        super().__init__()
        self.q, self.o = nn.Linear(16, 16), nn.Linear(16, 16)
        self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8)
        self.table = nn.Embedding(3, 4) if bias_table else None

    def forward(self, x):
        def heads(t):
            return t.view(2, 5, -1, 4).transpose(1, 2)
        mask = None
        if self.table is not None:  # T5: one learned bias per head and relative position
            relative = (torch.arange(5)[None, :] - torch.arange(5)[:, None]).clamp(-1, 1) + 1
            mask = self.table(relative).permute(2, 0, 1)
        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask,
                                           enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(2, 5, 16)).sum(1)


def test_grouped_query_attention_removes_a_kv_head_with_its_query_heads():
    an = analyse(GroupedQueryAttention(), torch.randn(2, 5, 16))
    q, k = roots(an, "q.weight"), roots(an, "k.weight")
    assert len(np.unique(q)) == 2 and blocked(an, "q.weight") == set()
    assert np.array_equal(q, np.repeat(k[::4], 8))          # query heads 2g, 2g+1 with kv head g
    assert np.array_equal(k, roots(an, "v.weight")) and np.array_equal(roots(an, "o.weight", 1), q)


def test_a_per_head_bias_table_goes_with_the_heads():
    an = analyse(GroupedQueryAttention(bias_table=True), torch.randn(2, 5, 16))
    q, table = roots(an, "q.weight"), roots(an, "table.weight", 1)
    assert np.array_equal(table, np.repeat(q[::8], 2)) and blocked(an, "q.weight") == set()


@torch.library.custom_op("fxprune_test::chanscale", mutates_args=())
def chanscale(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@chanscale.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_custom_op_blocks_until_a_rule_is_registered():
    model = Linear(lambda m, h, x: chanscale(h))
    assert blocked(analyse(model, X), "fc.weight") == {"chanscale (chanscale): not understood by the channel analysis"}

    @register_rule("chanscale")
    def _chanscale(an, node):  # channel-wise: channels pass through, zeros stay zeros
        x = an.value(node.args[0])
        return keep(x) if isinstance(x, Chan) else None

    try:
        an = analyse(model, X)
        assert blocked(an, "fc.weight") == set() and len(np.unique(roots(an, "fc.weight"))) == 16
        assert np.array_equal(roots(an, "head.weight", 1), roots(an, "fc.weight"))
    finally:
        RULES.pop("chanscale")


def test_register_rule_needs_names():
    with pytest.raises(ValueError, match="register_rule needs one or more op names"):
        register_rule()
