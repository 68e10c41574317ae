"""Measure peak host memory (RSS) of building the full-size WhisperX-VAE for inference.

Each variant runs in a fresh Python process and reports resource.getrusage(RUSAGE_SELF).ru_maxrss:

  baseline      import torch, transformers, whisperx_vae; nothing built
  ours          WhisperXVAE on the meta device (Whisper audio encoder only), then materialised on
                the CPU in float32 and every tensor written (so every page is resident)
  reference     what the reference's WhisperXVAE(cfg) constructor holds: the whole Whisper
                large-v3 (encoder + text decoder; here transformers' WhisperModel with large-v3
                dims, random init, float32) plus the same DAC encoder/decoder/bottleneck
  ours_ckpt     (--with-checkpoint) load_whisperx_vae on a synthetic full-size checkpoint in the
                release format (decoder weights included, as in the real file)
  reference_ckpt (--with-checkpoint) the reference's loading: torch.load of the whole checkpoint
                (no mmap), the full-Whisper model built, tensors copied in

Codec sizes follow the fixture manifest's ASSUMED release cfg (whisperx_vae.assumed_release_cfg).

    python3 tools/measure_vae_memory.py [--with-checkpoint] [--ckpt-dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _n_params(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _reference_model():
    import torch
    from transformers import WhisperConfig, WhisperModel

    import whisperx_vae as wv

    cfg = wv.assumed_release_cfg()
    d = wv.WHISPER_LARGE_V3_DIMS
    whisper_cfg = WhisperConfig(
        vocab_size=d.n_vocab, num_mel_bins=d.n_mels, d_model=d.n_audio_state,
        encoder_layers=d.n_audio_layer, encoder_attention_heads=d.n_audio_head, encoder_ffn_dim=4 * d.n_audio_state,
        decoder_layers=d.n_text_layer, decoder_attention_heads=d.n_text_head, decoder_ffn_dim=4 * d.n_text_state,
        max_source_positions=d.n_audio_ctx, max_target_positions=d.n_text_ctx,
    )
    enc = cfg.model.codec_encoder
    dec = cfg.model.codec_decoder
    parts = torch.nn.ModuleDict({
        "CodecEnc": wv.CodecEncoder(enc.in_dim, list(enc.ratios), enc.hidden_dim),
        "CodecDec": wv.CodecDecoder(enc.hidden_dim, dec.hidden_dim, list(dec.ratios)),
        "vae": wv.VAEBottleneck(enc.hidden_dim, dec.z_dim),
        "semantic_model": WhisperModel(whisper_cfg),
    })
    return parts.eval()


def run_variant(name: str, ckpt_path: str | None) -> dict:
    t0 = time.time()
    import torch
    import transformers  # noqa: F401

    import whisperx_vae as wv

    torch.set_num_threads(2)
    info = {"variant": name}
    if name == "baseline":
        pass
    elif name == "ours":
        model = wv.build_on_meta()
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)  # writes every page
        info["params"] = _n_params(model.parameters())
    elif name == "reference":
        model = _reference_model()
        info["params"] = _n_params(model.parameters())
    elif name == "ours_ckpt":
        model = wv.load_whisperx_vae(ckpt_path)
        with torch.no_grad():  # touch every weight, as inference would
            info["checksum"] = float(sum(p.double().sum() for p in model.parameters()))
        info["params"] = _n_params(model.parameters())
    elif name == "reference_ckpt":
        with torch.serialization.safe_globals(wv.CHECKPOINT_SAFE_GLOBALS):
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # no mmap, as the reference
        model = _reference_model()
        own = dict(model.named_parameters())
        with torch.no_grad():  # names differ inside Whisper; copy what matches (copies allocate nothing)
            for key, value in ckpt["state_dict"].items():
                if key in own and own[key].shape == value.shape:
                    own[key].copy_(value)
        info["params"] = _n_params(model.parameters())
        info["ckpt_tensors"] = _n_params(ckpt["state_dict"].values())
    else:
        raise ValueError(name)
    info["peak_rss_mib"] = round(_peak_mib(), 1)
    info["seconds"] = round(time.time() - t0, 1)
    return info


def write_full_size_checkpoint(path: str) -> None:
    """Release-format checkpoint with every tensor of the full-size reference model (manifest names),
    filled with small random values."""
    import json as _json

    import torch

    import whisperx_vae as wv

    manifest = _json.load(open(os.path.join(os.path.dirname(REPO), "shared", "fixtures", "av",
                                            "whisperx_vae_manifest.json")))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for e in manifest["entries"]:
        t = torch.empty(e["shape"], dtype=torch.float32)
        state[e["key"]] = t.normal_(0.0, 0.02, generator=gen) if t.dim() > 1 else t.fill_(1.0)
    sin = state["semantic_model.encoder.positional_embedding"]
    sin.copy_(wv.whisper_sinusoids(*sin.shape))
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": wv.assumed_release_cfg()}}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--with-checkpoint", action="store_true",
                    help="also measure loading a synthetic full-size checkpoint (~6.6 GB written to --ckpt-dir)")
    ap.add_argument("--ckpt-dir", default="/tmp")
    args = ap.parse_args()

    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.ckpt)))
        return

    variants = ["baseline", "ours", "reference"]
    ckpt = None
    if args.with_checkpoint:
        ckpt = os.path.join(args.ckpt_dir, "whisperx_vae_full_size_synthetic.ckpt")
        if not os.path.exists(ckpt):
            print(f"writing {ckpt} ...", flush=True)
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {REPO!r}); sys.argv=['x'];"
                            f"from tools.measure_vae_memory import write_full_size_checkpoint as w; w({ckpt!r})"],
                           check=True, cwd=REPO)
        variants += ["ours_ckpt", "reference_ckpt"]

    results = []
    for name in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name] + (["--ckpt", ckpt] if ckpt else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    base = results[0]["peak_rss_mib"]
    print(f"\n{'variant':<16}{'params':>16}{'peak RSS MiB':>15}{'minus baseline':>16}{'seconds':>9}")
    for r in results:
        print(f"{r['variant']:<16}{r.get('params', 0):>16,}{r['peak_rss_mib']:>15.0f}"
              f"{r['peak_rss_mib'] - base:>16.0f}{r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
