"""Models in the style of lucidrains/vit-pytorch (written from its layout, smaller): einops'
``rearrange``/``repeat`` functions and ``Rearrange`` layers in the forward, as research code
writes them. Needs ``pip install einops``.

CCT (Compact Convolutional Transformer, cct.py): a conv tokenizer with a max pool, tokens by
``rearrange(x, 'b c h w -> b (h w) c')``, a learned position embedding of the tokenizer's
sequence length added in place, attention written with einsum and ``rearrange``, sequence
pooling. SimpleViT (simple_vit.py): patches by a ``Rearrange`` layer, a 2-D sine-cosine
position embedding, a mean over the tokens (no resizing op: nothing to learn, said in one line).
CCTCls: CCT with a class token by ``repeat``. ViT (vit.py) and MAEPatchify (MAE's ``patchify``): below."""
import torch, torch.nn as nn, torch.nn.functional as F
from math import sqrt
from einops import rearrange, repeat
from einops.layers.torch import Rearrange


class Tokenizer(nn.Module):
    def __init__(self, kernel_size=3, stride=1, padding=1, n_conv_layers=1, n_input_channels=3, n_output_channels=64, in_planes=64):
        super().__init__()
        chans = [n_input_channels] + [in_planes] * (n_conv_layers - 1) + [n_output_channels]
        self.conv_layers = nn.Sequential(*[nn.Sequential(
            nn.Conv2d(a, b, kernel_size, stride, padding, bias=False), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)) for a, b in zip(chans[:-1], chans[1:])])

    def sequence_length(self, n_channels=3, height=224, width=224):
        return self.forward(torch.zeros((1, n_channels, height, width))).shape[1]

    def forward(self, x):
        return rearrange(self.conv_layers(x), 'b c h w -> b (h w) c')


class Attention(nn.Module):
    def __init__(self, dim, num_heads=2):
        super().__init__()
        self.heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=self.heads) for t in (q, k, v))
        attn = torch.einsum('b h i d, b h j d -> b h i j', q * self.scale, k).softmax(dim=-1)
        x = torch.einsum('b h i j, b h j d -> b h i d', attn, v)
        return self.proj(rearrange(x, 'b h n d -> b n (h d)'))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, src):
        src = src + self.self_attn(self.pre_norm(src))
        src = self.norm1(src)
        return src + self.linear2(F.gelu(self.linear1(src)))


class CCT(nn.Module):
    def __init__(self, img_size=32, embedding_dim=64, num_layers=2, num_heads=2, mlp_ratio=2, num_classes=10, seq_pool=True):
        super().__init__()
        self.tokenizer = Tokenizer(n_output_channels=embedding_dim)
        self.seq_pool = seq_pool
        seq = self.tokenizer.sequence_length(3, img_size, img_size)
        if seq_pool:
            self.attention_pool = nn.Linear(embedding_dim, 1)
        else:
            self.class_emb = nn.Parameter(torch.zeros(1, 1, embedding_dim))
            seq += 1
        self.positional_emb = nn.Parameter(torch.randn(1, seq, embedding_dim) * 0.2)
        self.blocks = nn.ModuleList([EncoderLayer(embedding_dim, num_heads, embedding_dim * mlp_ratio) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(embedding_dim)
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, x):
        x = self.tokenizer(x)
        if not self.seq_pool:
            cls_token = repeat(self.class_emb, '1 1 d -> b 1 d', b=x.shape[0])
            x = torch.cat((cls_token, x), dim=1)
        x += self.positional_emb
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.seq_pool:
            w = rearrange(self.attention_pool(x), 'b n 1 -> b n')
            x = torch.einsum('b n, b n d -> b d', w.softmax(dim=1), x)
        else:
            x = x[:, 0]
        return self.fc(x)


def CCTCls(num_classes=10):
    return CCT(num_classes=num_classes, seq_pool=False)


def posemb_sincos_2d(h, w, dim, temperature: int = 10000, dtype=torch.float32):
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = 1.0 / (temperature ** (torch.arange(dim // 4) / (dim // 4 - 1)))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).type(dtype)


class SimpleViT(nn.Module):
    def __init__(self, image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_size * patch_size * 3), nn.Linear(patch_size * patch_size * 3, dim), nn.LayerNorm(dim))
        self.pos_embedding = posemb_sincos_2d(image_size // patch_size, image_size // patch_size, dim)
        self.blocks = nn.ModuleList([EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.linear_head = nn.Linear(dim, num_classes)

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x = x + self.pos_embedding.to(x.device, dtype=x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.linear_head(x.mean(dim=1))


class ViT(nn.Module):
    """vit.py: patches by ``Rearrange``, a class token by ``repeat``, a learned position
    embedding added as ``x += self.pos_embedding[:, :(n + 1)]``, the class token's output."""
    def __init__(self, image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, pool="cls"):
        super().__init__()
        patch_dim = 3 * patch_size * patch_size
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.pool = pool
        self.mlp_head = nn.Linear(dim, num_classes)

    def forward(self, img):
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        cls_tokens = repeat(self.cls_token, "1 1 d -> b 1 d", b=b)
        x = torch.cat((cls_tokens, x), dim=1)
        x += self.pos_embedding[:, :(n + 1)]
        for blk in self.blocks:
            x = blk(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(x)


class MAEPatchify(nn.Module):
    """MAE's ``patchify``: ``reshape(N, C, h, p, w, p)``, ``einsum('nchpwq->nhwpqc')``, reshape to
    tokens; a fixed 2-D sine-cosine table (a buffer) added to them."""
    def __init__(self, image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=2):
        super().__init__()
        self.p = patch_size
        self.embed = nn.Linear(3 * patch_size ** 2, dim)
        self.register_buffer("pos", posemb_sincos_2d(image_size // patch_size, image_size // patch_size, dim)[None])
        self.blocks = nn.ModuleList([EncoderLayer(dim, heads, 2 * dim) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, imgs):
        p = self.p
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * 3)

    def forward(self, imgs):
        x = self.embed(self.patchify(imgs)) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


class PitPool(nn.Module):
    """pit.py's Pool: the class token through a Linear, the patch tokens back to a square map
    (``int(sqrt(n))``), a strided depthwise conv, tokens again."""
    def __init__(self, dim):
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim), nn.Conv2d(dim, 2 * dim, 1))
        self.cls_ff = nn.Linear(dim, dim * 2)

    def forward(self, x):
        cls_token, tokens = x[:, :1], x[:, 1:]
        cls_token = self.cls_ff(cls_token)
        tokens = rearrange(tokens, "b (h w) c -> b c h w", h=int(sqrt(tokens.shape[1])))
        tokens = rearrange(self.downsample(tokens), "b c h w -> b (h w) c")
        return torch.cat((cls_token, tokens), dim=1)


class PiT(nn.Module):
    """pit.py in small: conv-free patches (``nn.Unfold(p, stride=p)``), a class token, a
    position embedding, two stages joined by a ``PitPool``."""
    def __init__(self, image_size=32, patch_size=4, num_classes=10, dim=32, heads=2):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Sequential(nn.Unfold(kernel_size=patch_size, stride=patch_size),
                                                Rearrange("b c n -> b n c"), nn.Linear(3 * patch_size ** 2, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.stage1 = EncoderLayer(dim, heads, 2 * dim)
        self.pool = PitPool(dim)
        self.stage2 = EncoderLayer(2 * dim, heads, 4 * dim)
        self.mlp_head = nn.Linear(2 * dim, num_classes)

    def forward(self, img):
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls_token, "() n d -> b n d", b=b), x), dim=1)
        x += self.pos_embedding[:, :n + 1]
        x = self.stage2(self.pool(self.stage1(x)))
        return self.mlp_head(x[:, 0])
