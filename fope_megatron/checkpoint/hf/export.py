"""``fope-export``: a trained run's checkpoint -> a Hugging Face transformers model directory.

fope-export --run RUN_DIR [--checkpoint latest|step_N] --out HF_DIR [--dtype fp32|bf16] [--force]

The directory loads with ``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``
and ``AutoTokenizer.from_pretrained(HF_DIR)`` and nothing else: ``config.json`` (Llama fields, one
``fope`` block, ``auto_map``), ``configuration_fope_llama.py`` + ``modeling_fope_llama.py``,
``model.safetensors`` (sharded with an index above 5 GB), ``generation_config.json`` and the
tokenizer files. Any checkpoint layout the trainer writes is read (ZeRO 0-3, any TP/CP/Ulysses)
through the full (TP=1) state; the FoPE coefficients are the trained float32 tensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .mapping import megatron_to_hf

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_fope_llama.py", "modeling_fope_llama.py")
MAX_SHARD_SIZE = "5GB"
BYTE_EOS, BYTE_PAD = "<|endoftext|>", "<pad>"


class ExportError(Exception):
    """Bad input for the export (the CLI exits with code 2)."""


def fope_block(cfg, state: dict) -> dict:
    """The ``fope`` block of config.json: everything that fixes the position encoding."""
    from ...model.builder import softmax_scale

    m, f, pos = cfg.model, cfg.fope, cfg.position
    block = {
        "kind": m.position_embedding,
        "rotary_dim": m.rotary_dim,
        "rotary_percent": m.rotary_percent,
        "rope_theta": float(m.rotary_base),
        "interleaved": bool(f.interleaved),
        "scaling": pos.scaling,
        "factor": pos.factor,
        "original_max_position_embeddings": cfg.original_max_positions,
        "beta_fast": pos.beta_fast,
        "beta_slow": pos.beta_slow,
        "mscale": pos.mscale,
        "mscale_all_dim": pos.mscale_all_dim,
        "softmax_scale": softmax_scale(cfg),
    }
    if m.position_embedding == "fope":
        coef = state["decoder.layers.0.self_attention.fope.coef_cos"]
        block.update(
            sigma=f.sigma,
            floor_ratio=f.floor_ratio,
            train_seq_len=cfg.fope_train_seq_len,
            d_in=int(coef.shape[-2]),
            d_out=int(coef.shape[-1]),
            zero_freq_sin=float(f.zero_freq_sin),
            shared_across_layers=bool(f.shared_across_layers),
            learnable=bool(f.learnable),
        )
    return block


def hf_config(cfg, state: dict, vocab_size: int, dtype: torch.dtype, special: dict) -> dict:
    from ...model.builder import transformer_config

    m = cfg.model
    if m.normalization != "RMSNorm" or not m.swiglu:
        raise ExportError(
            f"model.normalization={m.normalization!r}, model.swiglu={m.swiglu}: the export writes "
            "a Llama model (RMSNorm + SwiGLU); other architectures are not supported"
        )
    tconf = transformer_config(cfg)
    tied = not m.untie_embeddings
    return {
        "architectures": ["FoPELlamaForCausalLM"],
        "model_type": "fope_llama",
        "auto_map": {
            "AutoConfig": "configuration_fope_llama.FoPELlamaConfig",
            "AutoModelForCausalLM": "modeling_fope_llama.FoPELlamaForCausalLM",
        },
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": tconf.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_groups,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": tconf.layernorm_epsilon,
        "rope_theta": float(m.rotary_base),
        "max_position_embeddings": cfg.train.seq_length,
        "tie_word_embeddings": tied,
        "attention_bias": bool(m.add_bias_linear),
        "mlp_bias": bool(m.add_bias_linear),
        "initializer_range": m.init_method_std,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special["eos"],
        "pad_token_id": special.get("pad"),
        "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
        "use_cache": True,
        "fope": fope_block(cfg, state),
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what ByteLevel pre-tokenizes to)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def byte_tokenizer():
    """fope-megatron's byte tokenizer (UTF-8 bytes = ids 0..255, EOD 256, pad 257) as a
    transformers fast tokenizer: byte-level pre-tokenizer, no merges, two special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS, BYTE_PAD])  # ids 256, 257
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=BYTE_EOS,
        pad_token=BYTE_PAD,
        clean_up_tokenization_spaces=False,
    )


def hf_tokenizer(name: str | None):
    """``(transformers tokenizer, special ids)`` for the run's ``data.tokenizer``."""
    if name in (None, "", "byte"):
        tok = byte_tokenizer()
        assert tok.convert_tokens_to_ids([BYTE_EOS, BYTE_PAD]) == [256, 257]
    else:
        from transformers import AutoTokenizer

        if not Path(name).exists():
            raise ExportError(f"data.tokenizer={name!r}: the run's tokenizer dir is not there")
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    special = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id}
    return tok, special


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def hf_weights(cfg, state: dict, special: dict, dtype: str = "fp32") -> tuple[dict, dict]:
    """``(config.json dict, transformers state dict)`` of a full (TP=1) megatron state."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    vocab = cfg.model.vocab_size
    config = hf_config(cfg, state, vocab, torch_dtype, special)
    weights = megatron_to_hf(
        state,
        heads=config["num_attention_heads"],
        groups=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        vocab_size=vocab,
        tied=config["tie_word_embeddings"],
    )
    # own storage per tensor (safetensors refuses views); the coefficients stay float32
    weights = {
        k: (v if k.endswith(("coef_cos", "coef_sin")) else v.to(torch_dtype)).clone()
        for k, v in weights.items()
    }
    return config, weights


def transformers_model(cfg, state: dict):
    """The exported model in memory (float32, eval mode), without writing a directory: what
    ``from_pretrained`` on the export gives (fope-eval's KV-cache passkey generation)."""
    from transformers import GenerationConfig

    from .configuration_fope_llama import FoPELlamaConfig
    from .modeling_fope_llama import FoPELlamaForCausalLM

    _, special = hf_tokenizer(cfg.data.tokenizer)
    config, weights = hf_weights(cfg, state, special)
    config = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "dtype")}
    model = FoPELlamaForCausalLM(FoPELlamaConfig(**config)).float().eval()
    result = model.load_state_dict(weights, strict=False)
    missing = set(result.missing_keys) - (
        {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    )
    if missing or result.unexpected_keys:
        raise ValueError(
            f"export mapping mismatch: missing {missing}, unexpected {result.unexpected_keys}"
        )
    model.generation_config = GenerationConfig(
        eos_token_id=special["eos"], pad_token_id=special.get("pad")
    )
    return model


def write_hf_dir(
    cfg, state: dict, out: str | Path, dtype: str = "fp32", force: bool = False
) -> Path:
    """Write the transformers directory of a full (TP=1) megatron state trained with ``cfg``."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    out = Path(out)
    tokenizer, special = hf_tokenizer(cfg.data.tokenizer)
    config, weights = hf_weights(cfg, state, special, dtype)
    prepare_out(out, force)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, out / name)
    save_torch_state_dict(weights, out, max_shard_size=MAX_SHARD_SIZE)
    GenerationConfig(
        bos_token_id=special.get("bos"),
        eos_token_id=special["eos"],
        pad_token_id=special.get("pad"),
        do_sample=False,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_run(
    run_dir: str | Path, out: str | Path, checkpoint: str = "latest", dtype: str = "fp32",
    force: bool = False,
) -> Path:  # fmt: skip
    """Export checkpoint ``checkpoint`` of ``run_dir`` (any layout) to ``out``."""
    from ...parallel.setup import ensure_accelerator
    from ..full_state import checkpoint_full_state, load_run_config
    from ..store import resolve_checkpoint

    ensure_accelerator()
    cfg = load_run_config(run_dir)
    path = resolve_checkpoint(run_dir, checkpoint)
    return write_hf_dir(cfg, checkpoint_full_state(path), out, dtype, force)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fope-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--run", required=True, help="training run dir (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest, step_N, or a checkpoint folder")
    p.add_argument("--out", required=True, help="output dir (transformers model directory)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    from ...compat.warnings import add_verbose_flag, quiet_known_warnings

    add_verbose_flag(p)
    args = p.parse_args(argv)
    quiet_known_warnings(args.verbose)
    try:
        out = export_run(args.run, args.out, args.checkpoint, args.dtype, args.force)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"fope-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load: AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True))")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
