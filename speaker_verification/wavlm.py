"""WavLM feature extractor of the speaker encoder, on transformers' WavLMModel.

The released speaker checkpoint stores WavLM under the fairseq/s3prl names
(`feature_extract.model.encoder.layers.0.self_attn.grep_a`, ...). The module
here runs transformers' implementation and speaks the fairseq names at its
state-dict boundary: `fairseq_to_hf_wavlm_key` renames on load and
`hf_to_fairseq_wavlm_key` renames on export, so `state_dict()` and
`load_state_dict()` of the speaker encoder use the checkpoint's names.

Hidden states are the ones s3prl's UpstreamExpert records with its hooks: the
input of every transformer layer, then the encoder output (after the encoder's
final LayerNorm). The raw output of the last layer is never exposed.
"""
import ast
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WavLMConfig, WavLMModel


@dataclass(frozen=True)
class WavLMArgs:
    """Architecture fields of a fairseq/s3prl WavLM `cfg` (same names)."""
    extractor_mode: str = "layer_norm"
    encoder_layers: int = 24
    encoder_embed_dim: int = 1024
    encoder_ffn_embed_dim: int = 4096
    encoder_attention_heads: int = 16
    activation_fn: str = "gelu"
    layer_norm_first: bool = True
    conv_feature_layers: str = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    conv_bias: bool = False
    normalize: bool = True  # per-utterance layer_norm of the waveform
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True

    @classmethod
    def from_cfg(cls, cfg: dict) -> "WavLMArgs":
        """Take the architecture fields of a checkpoint cfg dict; other fields are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})


def wavlm_large_args() -> WavLMArgs:
    """WavLM-Large, as torch.hub's s3prl `wavlm_large` builds it."""
    return WavLMArgs()


def tiny_wavlm_args() -> WavLMArgs:
    """The shrunk WavLM of the speaker_encoder fixture (tests and --demo)."""
    return WavLMArgs(
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    )


def parse_conv_feature_layers(spec: str) -> list:
    """[(dim, kernel, stride), ...] from fairseq's string, e.g. "[(512,10,5)] + [(512,3,2)] * 4".

    fairseq eval()s this string; only int tuples, lists, + and * are accepted here.
    """
    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported conv_feature_layers expression: {spec!r}")

    layers = value(ast.parse(spec, mode="eval"))
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 and all(type(v) is int for v in t) for t in layers
    ):
        raise ValueError(f"conv_feature_layers is not a list of (dim, kernel, stride): {spec!r}")
    return layers


def hf_wavlm_config(args: WavLMArgs) -> WavLMConfig:
    """transformers WavLMConfig computing what fairseq's WavLM(cfg) computes at inference."""
    unsupported = []
    if args.extractor_mode != "layer_norm":
        unsupported.append(f"extractor_mode={args.extractor_mode!r}")
    if not args.layer_norm_first:  # the post-LN variant exposes different hidden states
        unsupported.append("layer_norm_first=False")
    if not (args.relative_position_embedding and args.gru_rel_pos):
        unsupported.append("relative_position_embedding/gru_rel_pos off")
    if args.activation_fn != "gelu":
        unsupported.append(f"activation_fn={args.activation_fn!r}")
    if unsupported:
        raise ValueError("unsupported WavLM configuration (WavLM-Large layout expected): " + ", ".join(unsupported))
    conv = parse_conv_feature_layers(args.conv_feature_layers)
    return WavLMConfig(
        hidden_size=args.encoder_embed_dim,
        num_hidden_layers=args.encoder_layers,
        num_attention_heads=args.encoder_attention_heads,
        intermediate_size=args.encoder_ffn_embed_dim,
        hidden_act="gelu",
        feat_extract_norm="layer",  # fairseq "layer_norm" extractor: LayerNorm after every conv
        feat_extract_activation="gelu",
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=args.conv_bias,
        num_conv_pos_embeddings=args.conv_pos,
        num_conv_pos_embedding_groups=args.conv_pos_groups,
        do_stable_layer_norm=True,  # = layer_norm_first
        num_buckets=args.num_buckets,
        max_bucket_distance=args.max_distance,
        layer_norm_eps=1e-5,
        mask_time_prob=0.05,  # > 0 keeps masked_spec_embed (the checkpoint's mask_emb); unused in eval
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
    )


# (fairseq/s3prl name, transformers name) of WavLMModel tensors, as regex templates
# over a name relative to the WavLM module. `{L}` is a layer/conv index.
_WAVLM_KEY_PAIRS = [
    ("mask_emb", "masked_spec_embed"),
    ("feature_extractor.conv_layers.{L}.0.weight", "feature_extractor.conv_layers.{L}.conv.weight"),
    ("feature_extractor.conv_layers.{L}.2.1.{P}", "feature_extractor.conv_layers.{L}.layer_norm.{P}"),
    ("layer_norm.{P}", "feature_projection.layer_norm.{P}"),
    ("post_extract_proj.{P}", "feature_projection.projection.{P}"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.layers.{L}.self_attn.grep_a", "encoder.layers.{L}.attention.gru_rel_pos_const"),
    ("encoder.layers.{L}.self_attn.grep_linear.{P}", "encoder.layers.{L}.attention.gru_rel_pos_linear.{P}"),
    ("encoder.layers.{L}.self_attn.relative_attention_bias.weight",
     "encoder.layers.{L}.attention.rel_attn_embed.weight"),
    ("encoder.layers.{L}.self_attn.q_proj.{P}", "encoder.layers.{L}.attention.q_proj.{P}"),
    ("encoder.layers.{L}.self_attn.k_proj.{P}", "encoder.layers.{L}.attention.k_proj.{P}"),
    ("encoder.layers.{L}.self_attn.v_proj.{P}", "encoder.layers.{L}.attention.v_proj.{P}"),
    ("encoder.layers.{L}.self_attn.out_proj.{P}", "encoder.layers.{L}.attention.out_proj.{P}"),
    ("encoder.layers.{L}.self_attn_layer_norm.{P}", "encoder.layers.{L}.layer_norm.{P}"),
    ("encoder.layers.{L}.fc1.{P}", "encoder.layers.{L}.feed_forward.intermediate_dense.{P}"),
    ("encoder.layers.{L}.fc2.{P}", "encoder.layers.{L}.feed_forward.output_dense.{P}"),
    ("encoder.layers.{L}.final_layer_norm.{P}", "encoder.layers.{L}.final_layer_norm.{P}"),
    ("encoder.layer_norm.{P}", "encoder.layer_norm.{P}"),
]


def _compile(template: str):
    pattern = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{P\}", r"(?P<P>weight|bias)")
    return re.compile(pattern + r"\Z")


def _fill(template: str, match) -> str:
    return template.replace("{L}", match.groupdict().get("L") or "").replace("{P}", match.groupdict().get("P") or "")


_FAIRSEQ_TO_HF = [(_compile(fs), hf) for fs, hf in _WAVLM_KEY_PAIRS]
_HF_TO_FAIRSEQ = [(_compile(hf), fs) for fs, hf in _WAVLM_KEY_PAIRS]


def _convert(key: str, table) -> str:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return _fill(template, match)
    return key  # unknown names pass through, so strict loading reports them as they are


def fairseq_to_hf_wavlm_key(key: str) -> str:
    """fairseq/s3prl WavLM state-dict name -> transformers WavLMModel name (relative to the WavLM)."""
    return _convert(key, _FAIRSEQ_TO_HF)


def hf_to_fairseq_wavlm_key(key: str) -> str:
    """transformers WavLMModel name -> fairseq/s3prl name (inverse of fairseq_to_hf_wavlm_key)."""
    return _convert(key, _HF_TO_FAIRSEQ)


def _rename_keys(state_dict, prefix: str, rename) -> None:
    """Rename, in place and keeping the order, the keys of state_dict under `prefix`."""
    for key in list(state_dict.keys()):
        value = state_dict.pop(key)
        if key.startswith(prefix):
            key = prefix + rename(key[len(prefix):])
        state_dict[key] = value


class WavLMUpstream(nn.Module):
    """Waveforms -> WavLM hidden states as s3prl's `wavlm_large` upstream returns them.

    `self.model` is transformers' WavLMModel; its state dict is exchanged in fairseq names.
    """

    def __init__(self, args: WavLMArgs):
        super().__init__()
        self.args = args
        self.model = WavLMModel(hf_wavlm_config(args))
        self.register_state_dict_post_hook(self._export_fairseq_names)
        self.register_load_state_dict_pre_hook(self._import_fairseq_names)

    @staticmethod
    def _export_fairseq_names(module, state_dict, prefix, local_metadata):
        _rename_keys(state_dict, prefix + "model.", hf_to_fairseq_wavlm_key)

    @staticmethod
    def _import_fairseq_names(module, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _rename_keys(state_dict, prefix + "model.", fairseq_to_hf_wavlm_key)

    @property
    def num_hidden_states(self) -> int:
        return self.args.encoder_layers + 1

    def forward(self, wav_bt: torch.Tensor) -> list:
        """(B, T) 16 kHz waveforms of equal length -> list of L+1 tensors (B, T', D)."""
        if wav_bt.dim() != 2:
            raise ValueError(f"expected waveforms of shape (B, T), got {tuple(wav_bt.shape)}")
        if self.args.normalize:  # per utterance, no affine, eps 1e-5 (s3prl)
            wav_bt = F.layer_norm(wav_bt, wav_bt.shape[-1:])
        wavlm = self.model
        features_btc = wavlm.feature_extractor(wav_bt).transpose(1, 2)
        hidden_btd, _ = wavlm.feature_projection(features_btc)
        encoder = wavlm.encoder
        hidden_btd = hidden_btd + encoder.pos_conv_embed(hidden_btd)
        hidden_states = []
        position_bias = None  # built by layer 0 from rel_attn_embed, reused un-gated by later layers
        for layer in encoder.layers:
            hidden_states.append(hidden_btd)
            hidden_btd, position_bias = layer(hidden_btd, attention_mask=None, position_bias=position_bias)[:2]
        hidden_states.append(encoder.layer_norm(hidden_btd))
        return hidden_states
