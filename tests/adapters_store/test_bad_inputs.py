"""The bad-input corpus: each upload is refused with a message that says what is wrong and
where, with the right exit code, and nothing at all is stored (no Redis key, no S3 object)."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from adapters_store.format import encode_adapter
from services.engine.adapter_format import AdapterKind, AdapterSpec
from tests.adapters_store.helpers import BASE_MODEL_ID, C_ATTN, adapter_bytes, adapter_tensors, lora_spec, run_cli

A0, B0 = f"{C_ATTN[0]}.lora_A", f"{C_ATTN[0]}.lora_B"


def _file(data: bytes, name: str = "user42.safetensors") -> Callable[[Path], list]:
    def make(tmp: Path) -> list:
        (tmp / name).write_bytes(data)
        return [tmp / name]

    return make


def _tensors(change: Callable[[dict], None], spec: AdapterSpec | None = None) -> bytes:
    spec = spec or lora_spec()
    tensors = adapter_tensors(spec)
    change(tensors)
    return encode_adapter(spec, tensors)


def _with_metadata(**changes: str | None) -> bytes:
    """A valid file whose header metadata is edited afterwards (None removes a key)."""
    data = adapter_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {k: v for k, v in {**header["__metadata__"], **changes}.items() if v is not None}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def _set(name: str, index: tuple, value: float) -> Callable[[dict], None]:
    return lambda tensors: tensors[name].__setitem__(index, value)


def _peft_dir(config_changes: dict, weights: bool = True, bin_only: bool = False) -> Callable[[Path], list]:
    """A PEFT LoRA directory as PEFT writes it, with its config edited."""

    def make(tmp: Path) -> list:
        directory = tmp / "user42"
        directory.mkdir()
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "bias": "none",
                  "base_model_name_or_path": BASE_MODEL_ID, **config_changes}  # fmt: skip
        (directory / "adapter_config.json").write_text(json.dumps(config))
        tensors = {f"base_model.model.{n}.weight": t for n, t in adapter_tensors(lora_spec()).items()}
        if weights:
            (directory / "adapter_model.safetensors").write_bytes(safetensors_save(tensors, {"format": "pt"}))
        if bin_only:
            (directory / "adapter_model.bin").write_bytes(pickle.dumps({"not": "loaded"}))
        return [directory]

    return make


def _torch_save(tmp: Path) -> list:
    torch.save(adapter_tensors(lora_spec()), tmp / "user42.safetensors")
    return [tmp / "user42.safetensors"]


def _huge_header() -> bytes:
    return _with_metadata(notes="x" * (1024 * 1024 + 1))


def _int8() -> bytes:
    from adapters_store.format import spec_metadata

    tensors = {n: t.to(torch.int8) for n, t in adapter_tensors(lora_spec()).items()}
    return safetensors_save(tensors, spec_metadata(lora_spec()))


VALID, HUGE = adapter_bytes(), _huge_header()
CORPUS = {
    # name: (make input -> CLI args, exit code, expected message fragment)
    "empty file": (_file(b""), 3, "user42.safetensors: file is empty (0 bytes)"),
    "truncated data": (_file(VALID[: len(VALID) - 100]), 3, f"truncated: tensors need {len(VALID) - 8 - struct.unpack('<Q', VALID[:8])[0]} bytes of data"),
    "truncated header": (_file(VALID[:40]), 3, "not a safetensors file, or truncated: its first 8 bytes declare a"),
    "shorter than a length": (_file(VALID[:5]), 3, "truncated: 5 bytes, shorter than the 8-byte header length"),
    "not safetensors": (_file(b"hello, I am a text file and not an adapter\n"), 3, "not a safetensors file, or truncated"),
    "json, not safetensors": (_file(b'{"lora_A": [[1.0, 2.0]], "lora_B": [[3.0]]}'), 3, "not a safetensors file, or truncated"),
    "pickle renamed": (_file(pickle.dumps({"lora_A": [1.0]}, protocol=4)), 3, "is a Python pickle (protocol 4), not safetensors"),
    "torch.save renamed": (_torch_save, 3, "is a zip archive (torch.save format), not safetensors"),
    "oversized header": (_file(HUGE), 3, f"header is {struct.unpack('<Q', HUGE[:8])[0]} bytes, over the 1048576-byte limit"),
    "file over the size cap": (_file(VALID), 3, f"file is {len(VALID)} bytes, over the 1000-byte limit"),
    "wrong shape": (_file(_tensors(lambda t: t.__setitem__(A0, torch.zeros(4, 65)))), 3,
                    f"tensor {A0} has shape [4, 65], expected [4, 64] for {C_ATTN[0]} (d_in 64, d_out 96, rank 4)"),
    "rank disagrees with header": (_file(_tensors(lambda t: t.update({A0: torch.zeros(8, 64), B0: torch.zeros(96, 8)}))), 3,
                                   f"tensor {A0} has shape [8, 64], expected [4, 64]"),
    "unknown module": (_file(adapter_bytes(lora_spec(targets=("transformer.h.7.attn.c_attn",)))), 3,
                       "target transformer.h.7.attn.c_attn is not a linear module of base model test/tiny-gptbigcode (did you mean transformer.h.1.attn.c_attn?)"),
    "another model's module names": (_file(adapter_bytes(lora_spec(targets=("model.layers.0.self_attn.q_proj",)))), 3,
                                     "target model.layers.0.self_attn.q_proj is not a linear module of base model test/tiny-gptbigcode"),
    "rank 0": (_file(_with_metadata(rank="0")), 3, "header metadata: rank must be >= 1, got 0"),
    "rank above the limit": (lambda tmp: [*_file(adapter_bytes(lora_spec(rank=16)))(tmp), "--max-rank", "8"], 3, "rank 16 is above the limit of 8"),
    "NaN": (_file(_tensors(_set(B0, (5, 2), float("nan")))), 3, f"tensor {B0} has 1 NaN and 0 Inf values (first at index [5, 2])"),
    "Inf": (_file(_tensors(_set(A0, (0, 3), float("-inf")))), 3, f"tensor {A0} has 0 NaN and 1 Inf values (first at index [0, 3])"),
    "wrong base model": (_file(adapter_bytes(lora_spec(base_model="bigcode/starcoder"))), 3,
                         "adapter is for base model 'bigcode/starcoder', this deployment serves 'test/tiny-gptbigcode'"),
    "kind says flora, tensors are lora": (_file(_with_metadata(kind="flora", alpha=None)), 3,
                                          f"tensor {A0} is a lora tensor but the header says kind=flora"),
    "lora without alpha": (_file(_with_metadata(alpha=None)), 3, "alpha is required for lora and only for lora"),
    "ia3 with rank 4": (_file(_with_metadata(kind="ia3", alpha=None)), 3, "an ia3 adapter has rank 1, got 4"),
    "not a flora-gateway file": (_file(_with_metadata(format_version=None, kind=None)), 3, "header metadata lacks ['format_version', 'kind']"),
    "missing tensor": (_file(_tensors(lambda t: t.pop(B0))), 3, f"target {C_ATTN[0]} lacks tensor(s) ['{B0}']"),
    "extra tensor": (_file(_tensors(lambda t: t.update({f"{C_ATTN[0]}.bias": torch.zeros(96)}))), 3,
                     f"tensor {C_ATTN[0]}.bias is not an adapter tensor"),
    "float64": (_file(adapter_bytes(dtype=torch.float64)), 3, f"tensor {A0} has dtype F64, allowed: ['F32', 'F16', 'BF16']"),
    "int8": (_file(_int8()), 3, f"tensor {A0} has dtype I8"),
    "missing file": (lambda tmp: [tmp / "nowhere.safetensors"], 3, "cannot read file: No such file or directory"),
    "plain directory": (lambda tmp: [tmp], 2, "is a directory without adapter_config.json"),
    "PEFT DoRA": (_peft_dir({"use_dora": True}), 3, "use_dora=true: DoRA adapters are not supported"),
    "PEFT per-module ranks": (_peft_dir({"rank_pattern": {"c_attn": 8}}), 3, "per-module ranks or alphas are not supported"),
    "PEFT prefix tuning": (_peft_dir({"peft_type": "PREFIX_TUNING"}), 3, "peft_type 'PREFIX_TUNING' is not supported (LORA or IA3)"),
    "PEFT pickle only": (_peft_dir({}, weights=False, bin_only=True), 3, "only adapter_model.bin, a pickle, which is never loaded"),
    "PEFT without base model": (_peft_dir({"base_model_name_or_path": None}), 3, "does not name the base model: pass --base-model ID"),
    "PEFT adapter_model.safetensors as a file": (
        lambda tmp: [_peft_dir({})(tmp)[0] / "adapter_model.safetensors", "--tenant", "user42"], 3, "upload its directory instead"),
    "tenant with a path separator": (lambda tmp: [*_file(VALID)(tmp), "--tenant", "../evil"], 2, "tenant name '../evil' has '.' at position 0"),
    "tenant with a slash": (lambda tmp: [*_file(VALID)(tmp), "--tenant", "a/b"], 2, "tenant name 'a/b' contains a path separator '/' at position 1"),
    "tenant with a control character": (lambda tmp: [*_file(VALID)(tmp), "--tenant", "bell\x07"], 2,
                                        "tenant name 'bell\\x07' contains control character U+0007 at position 4"),
    "file stem with a control character": (_file(VALID, "evil\x1b[31m.safetensors"), 2,
                                           "the tenant defaults to the file name's stem, but tenant name 'evil\\x1b[31m' contains control character U+001B"),
    "file stem with a space": (_file(VALID, "my adapter.safetensors"), 2, "tenant name 'my adapter' has ' ' at position 2, which is not allowed there; use letters"),
    "adapter name with a separator": (lambda tmp: [*_file(VALID)(tmp), "--name", "x\\y"], 2, "adapter name 'x\\\\y' contains a path separator"),
}  # fmt: skip
ENVIRONMENT = {"file over the size cap": {"FLORA_MAX_ADAPTER_BYTES": "1000"}}


@pytest.mark.parametrize("case", CORPUS, ids=list(CORPUS))
def test_bad_input_is_refused_and_nothing_is_stored(case, store_env, tmp_path, monkeypatch):
    make, code, message = CORPUS[case]
    for name, value in ENVIRONMENT.get(case, {}).items():
        monkeypatch.setenv(name, value)
    result = run_cli("upload", *make(tmp_path))
    assert result.code == code, result.err
    assert message in result.err
    assert result.err.startswith("adapterctl: error: ") and "Traceback" not in result.err
    assert store_env.redis_keys() == [] and store_env.s3_keys() == []


@pytest.mark.parametrize("case", ["NaN", "wrong shape", "pickle renamed", "PEFT DoRA"])
def test_validate_reports_the_same_problems(case, store_env, tmp_path):
    make, code, message = CORPUS[case]
    result = run_cli("validate", *make(tmp_path), "--json")
    assert result.code == code and message in result.json["error"]["message"]
    assert result.json["error"]["type"] == "AdapterValidationError" and result.json["error"]["problems"]


def test_every_problem_is_listed(store_env, tmp_path):
    """Several bad tensors: one message naming each, not just the first."""

    def spoil(tensors: dict) -> None:
        tensors[A0][0, 0] = float("nan")
        tensors[f"{C_ATTN[1]}.lora_B"][1, 1] = float("inf")

    (tmp_path / "user42.safetensors").write_bytes(_tensors(spoil))
    result = run_cli("validate", tmp_path / "user42.safetensors", "--json")
    assert result.json["error"]["problems"] == [
        f"tensor {A0} has 1 NaN and 0 Inf values (first at index [0, 0])",
        f"tensor {C_ATTN[1]}.lora_B has 0 NaN and 1 Inf values (first at index [1, 1])",
    ]
    assert "2 problems:\n  - tensor" in result.err


def test_flora_and_ia3_files_are_accepted(store_env, tmp_path):
    for i, spec in enumerate([AdapterSpec(AdapterKind.FLORA, 2, C_ATTN, BASE_MODEL_ID), AdapterSpec(AdapterKind.IA3, 1, C_ATTN, BASE_MODEL_ID)]):
        (tmp_path / f"t{i}.safetensors").write_bytes(encode_adapter(spec, adapter_tensors(spec, dtype=torch.bfloat16)))
        result = run_cli("upload", tmp_path / f"t{i}.safetensors", "--json")
        assert result.code == 0, result.err
        assert (result.json["version"]["kind"], result.json["version"]["rank"]) == (spec.kind.value, spec.rank)
