"""Third-party models in small configs (random init, nothing downloaded), their seeded inputs, and
an independent count of the bytes a forward pass keeps for backward.

Shared by ``tests/test_zoo.py`` (coverage, exactness, revert) and ``benchmarks/bench_coverage.py``
(the saved-bytes table). Every model is built in training mode with dropout, stochastic depth,
layer drop and SpecAugment masking off, so two copies run the same forward pass; the libraries
are imported only by the builders that need them.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["BENCH_ONLY", "ZOO", "ZooModel", "loss_of", "output_tensors", "saved_bytes"]


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: ``build()`` gives a seeded, freshly initialised model in training
    mode; ``inputs()`` its positional inputs (seeded, the same on every call); ``config`` says
    what was built, for the benchmark's table."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    config: str


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape, generator=_seeded(1)),)


def _tokens(vocab: int, batch: int, length: int) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, vocab, (batch, length), generator=_seeded(1)),)


def _train(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded_build() -> nn.Module:
        torch.manual_seed(0)
        return build().train()

    return seeded_build


# --- torchvision --------------------------------------------------------------------------------
def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _mobilenet_v3_small() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=10, dropout=0.0)


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)


def _swin_t() -> nn.Module:
    from torchvision.models import SwinTransformer

    # 32x32 images: 8x8 patches in stage 1 (4x4 windows, shifted by 2), 4x4 in stage 2
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10)


def _r3d_18() -> nn.Module:
    import torchvision

    return torchvision.models.video.r3d_18(num_classes=10)


# --- timm ---------------------------------------------------------------------------------------
def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=10)


def _timm_convnext() -> nn.Module:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)


# --- Hugging Face transformers and peft ---------------------------------------------------------
VOCAB = 64
#: the experts implementations of transformers' mixture-of-experts layers that run on CPU
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 2, vocab_size: int = VOCAB,
          dropout: float = 0.0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)  # lm_head.weight is transformer.wte.weight (tied)


class _LMLoss(nn.Module):
    """A causal LM whose forward returns its own loss on the input tokens (logits and their
    log-softmax then count as saved, as in training)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, labels=ids).loss


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertModel(config)  # with its pooler


def _llama_config(hidden: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1, vocab: int = VOCAB,
                  positions: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                       attention_dropout=0.0, tie_word_embeddings=False, use_cache=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _llama_sized(**sizes: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config(**sizes))


def _llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config())


def _llama_lora() -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(_llama_config()), lora)  # base weights frozen


def _wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    # the positional conv embedding is weight-normed (torch.nn.utils.parametrizations.weight_norm)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                            mask_time_prob=0.0, mask_feature_prob=0.0)
    return Wav2Vec2Model(config)


def _mixtral(impl: str, hidden: int = 32, layers: int = 2, experts: int = 4, heads: int = 4, kv_heads: int = 2,
             intermediate: Optional[int] = None, vocab: int = VOCAB) -> Callable[[], nn.Module]:
    """A Mixtral-style causal LM (top-2 routing) whose experts run transformers' ``impl``
    (``eager``: a per-expert ``F.linear`` on a slice of the 3-D weight; ``batched_mm``: ``bmm``
    against rows gathered from it; ``grouped_mm``: ``F.grouped_mm`` with offsets)."""

    def build() -> nn.Module:
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=256,
                               router_jitter_noise=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                               use_cache=False, experts_implementation=impl, bos_token_id=0, eos_token_id=0,
                               pad_token_id=0)
        return MixtralForCausalLM(config)

    return build


def _mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    # on CPU without the CUDA kernels its mixer runs the slow path: dt_proj.weight @ x (weight first)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                         conv_kernel=4, time_step_rank=4, use_cache=False, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MambaForCausalLM(config)


class EinsumBmmBilinearNet(nn.Module):
    """Weights used as raw parameters: an einsum against per-head weights (both operand orders), a
    bmm against a 3-D weight, then a bilinear layer (whose weight DropIT reports as not covered)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.heads = nn.Parameter(0.2 * torch.randn(4, 16, 8))
        self.mix = nn.Parameter(0.2 * torch.randn(4, 8, 8))
        self.out = nn.Bilinear(8, 8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, L, 16)
        e = torch.einsum("bld,hdk->hblk", h, self.heads).flatten(1, 2)  # (4, B*L, 8)
        e = e + torch.einsum("hdk,bld->hblk", self.heads, h * h).flatten(1, 2)
        z = torch.bmm(torch.relu(e), self.mix).sum(0).to(self.out.weight.dtype)  # (B*L, 8); bilinear
        return self.out(z, torch.sin(z))  # does not autocast: its operands in the weight's dtype


# --- small nets for the transposed convolutions -------------------------------------------------
class ConvTranspose2dNet(nn.Module):
    """An encoder-decoder: a strided conv, then two transposed convs back to the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.out = nn.ConvTranspose2d(8, 3, 3, padding=1, groups=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.up(self.act(self.down(x)))))


class ConvTranspose1d3dNet(nn.Module):
    """A conv1d, a transposed conv1d, then the sequence folded into a volume for a transposed conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.up1d = nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1)
        self.up3d = nn.ConvTranspose3d(2, 4, 2, stride=2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.up1d(self.act(self.conv(x))))  # (N, 8, 2L)
        return self.up3d(y.reshape(y.shape[0], 2, 4, 4, -1))


#: the models of the coverage tests and of the benchmark's table
ZOO: tuple[ZooModel, ...] = (
    ZooModel("resnet18", _train(_resnet18), _images(2, 3, 32, 32),
             "torchvision resnet18(num_classes=10); input 2x3x32x32"),
    ZooModel("mobilenet_v3_small", _train(_mobilenet_v3_small), _images(2, 3, 32, 32),
             "torchvision mobilenet_v3_small(num_classes=10, dropout=0); input 2x3x32x32"),
    ZooModel("vit", _train(_vit), _images(2, 3, 32, 32),
             "torchvision VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, "
             "hidden_dim=32, mlp_dim=64, num_classes=10); input 2x3x32x32"),
    ZooModel("swin_t", _train(_swin_t), _images(2, 3, 32, 32),
             "torchvision SwinTransformer(patch_size=[4,4], embed_dim=16, depths=[2,2], num_heads=[2,2], "
             "window_size=[4,4], stochastic_depth_prob=0, num_classes=10); input 2x3x32x32"),
    ZooModel("r3d_18", _train(_r3d_18), _images(2, 3, 4, 16, 16),
             "torchvision video r3d_18(num_classes=10); input 2x3x4x16x16"),
    ZooModel("timm_vit", _train(_timm_vit), _images(2, 3, 32, 32),
             "timm VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, "
             "mlp_ratio=2, num_classes=10); input 2x3x32x32"),
    ZooModel("timm_convnext", _train(_timm_convnext), _images(2, 3, 32, 32),
             "timm ConvNeXt(depths=(1,1,1,1), dims=(8,16,24,32), num_classes=10); input 2x3x32x32"),
    ZooModel("gpt2", _train(_gpt2), _tokens(VOCAB, 2, 16),
             "transformers GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=128, n_embd=32, "
             "n_layer=2, n_head=2, dropouts 0)); input 2x16 tokens"),
    ZooModel("bert", _train(_bert), _tokens(VOCAB, 2, 16),
             "transformers BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, "
             "num_attention_heads=2, intermediate_size=64, dropouts 0)); input 2x16 tokens"),
    ZooModel("llama", _train(_llama), _tokens(VOCAB, 2, 16),
             "transformers LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, "
             "intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, "
             "untied)); input 2x16 tokens"),
    ZooModel("llama_lora", _train(_llama_lora), _tokens(VOCAB, 2, 16),
             "peft LoraConfig(r=4, lora_alpha=8, lora_dropout=0, target_modules=[q_proj, v_proj]) on "
             "the llama above; input 2x16 tokens"),
    ZooModel("wav2vec2", _train(_wav2vec2), _images(2, 800),
             "transformers Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, "
             "num_attention_heads=2, intermediate_size=64, conv_dim=(16,16), conv_stride=(5,2), "
             "conv_kernel=(10,3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, "
             "dropouts, layerdrop and masking 0)); input 2x800 samples"),
    ZooModel("convtranspose2d", _train(ConvTranspose2dNet), _images(2, 3, 16, 16),
             "Conv2d(3,8,3,s2) -> ConvTranspose2d(8,8,4,s2) -> ConvTranspose2d(8,3,3); input 2x3x16x16"),
    ZooModel("convtranspose1d3d", _train(ConvTranspose1d3dNet), _images(2, 4, 16),
             "Conv1d(4,8,3) -> ConvTranspose1d(8,8,4,s2) -> fold -> ConvTranspose3d(2,4,2,s2); input 2x4x16"),
    *(ZooModel(f"mixtral_{impl}", _train(_mixtral(impl)), _tokens(VOCAB, 2, 16),
               f"transformers MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, "
               f"num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, "
               f"num_experts_per_tok=2, experts_implementation={impl!r})); input 2x16 tokens")
      for impl in EXPERTS_IMPLEMENTATIONS),
    ZooModel("mamba", _train(_mamba), _tokens(VOCAB, 2, 16),
             "transformers MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, "
             "num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4)), slow path; input 2x16 tokens"),
    ZooModel("einsum_bmm_bilinear", _train(EinsumBmmBilinearNet), _images(2, 5, 8),
             "Linear(8,16) -> einsum against a (4,16,8) weight, both operand orders -> bmm against a (4,8,8) "
             "weight -> Bilinear(8,8,6); input 2x5x8"),
)

#: measured by the benchmark only (too large for the tests)
BENCH_ONLY: tuple[ZooModel, ...] = (
    *(ZooModel(f"mixtral_4x256_{impl}", _train(_mixtral(impl, hidden=256, layers=4, experts=8, heads=8,
                                                         kv_heads=2, intermediate=512, vocab=1024)),
               _tokens(1024, 4, 128),
               f"transformers MixtralForCausalLM(MixtralConfig(vocab_size=1024, hidden_size=256, "
               f"intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, "
               f"num_local_experts=8, num_experts_per_tok=2, experts_implementation={impl!r})); input 4x128 tokens")
      for impl in EXPERTS_IMPLEMENTATIONS),
    ZooModel("llama_4x256", _train(lambda: _llama_sized(hidden=256, layers=4, heads=8, kv_heads=2, vocab=1024, positions=256)),
             _tokens(1024, 4, 128),
             "transformers LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, "
             "num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, untied)); input 4x128 tokens"),
    ZooModel("gpt2_small", _train(lambda: _gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)),
             _tokens(50257, 2, 128),
             "transformers GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=768, "
             "n_layer=12, n_head=12, dropouts 0)); input 2x128 tokens"),
    ZooModel("gpt2_small_8x128", _train(lambda: _LMLoss(_gpt2(n_layer=12, n_embd=768, n_head=12,
                                                             vocab_size=50257, dropout=0.1))),
             _tokens(50257, 8, 128),
             "transformers GPT2LMHeadModel, GPT-2-small config, default dropout 0.1, its own LM loss "
             "(labels = input); input 8x128 tokens"),
)


# --- outputs and loss ---------------------------------------------------------------------------
def output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, a tuple, a dict or an HF ModelOutput)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def loss_of(output: Any) -> torch.Tensor:
    """A scalar that depends on every output element: each output tensor against fixed random
    weights (a plain sum would give a layer-normed output no gradient)."""
    gen = _seeded(2)
    total = torch.zeros(())
    for t in output_tensors(output):
        total = total + (t.float() * torch.randn(t.shape, generator=gen)).sum()
    return total


# --- saved-for-backward bytes -------------------------------------------------------------------
def _storage(t: torch.Tensor) -> tuple[tuple, int]:
    """(key of the memory ``t`` lives in, bytes of that memory)."""
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr()), st.nbytes()


class _Held:
    """What the pack hook hands autograd; autograd dropping it means the graph no longer needs it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``obj`` through containers and object attributes (a few levels)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 4 or isinstance(obj, (str, bytes, int, float, bool, type(None), nn.Module, type)):
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        items = list(getattr(obj, "__dict__", {}).values())
        items += [getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s)]
    for item in items:
        yield from _tensors_in(item, depth + 1)


def _ctx_tensors(output: Any) -> Iterator[torch.Tensor]:
    """Tensors that custom autograd functions keep as ``ctx`` attributes (outside
    ``save_for_backward``, so the saved-tensor hooks never see them), found by walking the graph."""
    todo = [t.grad_fn for t in output_tensors(output) if t.grad_fn is not None]
    seen: set[int] = set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(n for n, _ in node.next_functions if n is not None)
        yield from _tensors_in(list(getattr(node, "__dict__", {}).values()))


def saved_bytes(model: nn.Module, *inputs: Any) -> int:
    """Bytes that one forward pass of ``model`` leaves in its autograd graph: the unique storages
    saved for backward (through ``saved_tensors_hooks``) or kept as custom functions' ``ctx``
    attributes, that the graph still holds when the forward returns. The model's parameters and
    buffers are not counted. Each storage counts once, with its full size."""
    own = {_storage(t)[0] for t in (*model.parameters(), *model.buffers())}
    held: list[tuple[weakref.ref, torch.Tensor]] = []

    def pack(t: torch.Tensor) -> _Held:
        h = _Held(t.detach())  # detached: an op saving its own output makes no reference cycle
        held.append((weakref.ref(h), h.tensor))
        return h

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        output = model(*inputs)
    live = [t for ref, t in held if ref() is not None]
    sizes: dict[tuple, int] = {}
    for t in (*live, *_ctx_tensors(output)):
        key, nbytes = _storage(t)
        if key not in own:
            sizes[key] = max(sizes.get(key, 0), nbytes)
    return sum(sizes.values())
