"""Checkpoint I/O: opening HF / PEFT dirs and files lazily, the streaming sharded writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergehub.errors import InputError
from mergehub.storage.checkpoint import open_checkpoint, peft_target_weight
from mergehub.storage.safetensors_format import SAFETENSORS_DTYPE, TensorSpec
from mergehub.storage.writer import model_side_files, plan_shards, write_model_dir
from mergehub.units import parse_size


def _reference(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir or file, read with the safetensors library itself."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("key", ["base-bf16", "base-fp16", "base-fp32", "sharded-bf16", "lora"])
def test_open_lists_and_loads_like_safetensors(models, key):
    ref = _reference(models[key])
    with open_checkpoint(models[key]) as ckpt:
        assert ckpt.format == ("peft" if key == "lora" else "hf")
        assert set(ckpt.tensors) == set(ref)
        for name, tensor in ref.items():
            spec = ckpt.tensors[name].spec
            assert spec.shape == tuple(tensor.shape)
            assert spec.dtype == SAFETENSORS_DTYPE[tensor.dtype]
            loaded = ckpt.load(name)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
            assert ckpt.read_bytes(name) == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_sharded_dir_uses_index_and_keeps_side_files(models):
    ckpt = open_checkpoint(models["sharded-bf16"])
    index = json.loads((models["sharded-bf16"] / "model.safetensors.index.json").read_text())
    assert len(ckpt.headers) > 1
    assert {n: t.file for n, t in ckpt.tensors.items()} == index["weight_map"]
    assert "config.json" in ckpt.side_files and "model.safetensors.index.json" in ckpt.side_files


def test_peft_dir(models):
    ckpt = open_checkpoint(models["lora"])
    assert ckpt.adapter_config["peft_type"] == "LORA"
    assert all(".lora_" in n for n in ckpt.tensors)
    assert "adapter_config.json" in ckpt.side_files


def test_single_file(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, path, metadata={"note": "x"})
    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.side_files == []
    assert ckpt.headers["w.safetensors"].metadata == {"note": "x"}
    for k, v in tensors.items():
        assert torch.equal(ckpt.load(k), v)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "x.pth", "last.ckpt"])
def test_pickle_file_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InputError, match="pickle checkpoint refused.*arbitrary code.*safetensors"):
        open_checkpoint(path)


def test_pickle_only_dirs_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"pytorch_model\.bin: pickle checkpoint refused"):
        open_checkpoint(hf)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"adapter_model\.bin: pickle checkpoint refused"):
        open_checkpoint(peft)


def test_safetensors_preferred_over_pickle_beside_it(models, tmp_path):
    import shutil

    d = tmp_path / "both"
    shutil.copytree(models["base-bf16"], d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    (d / "training_args.bin").write_bytes(b"x")
    ckpt = open_checkpoint(d)
    assert not any(f.endswith(".bin") for f in ckpt.side_files)


def _header_file(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("content, message", [
    (b"", "not a safetensors file"),
    (b"hello world, definitely not safetensors", "header length"),
    (struct.pack("<Q", 5) + b"{oops", "header: not valid JSON"),
])
def test_not_safetensors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        open_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 12 bytes"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlaps"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly dtype, shape, data_offsets"),
])
def test_corrupt_header_names_tensor(tmp_path, header, data, message):
    path = _header_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError, match=message) as e:
        open_checkpoint(path)
    assert "tensor" in str(e.value) or "bytes" in str(e.value)


def test_index_disagreeing_with_shards(models, tmp_path):
    import shutil

    d = tmp_path / "sharded"
    shutil.copytree(models["sharded-bf16"], d)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"]["ghost.weight"] = index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="'ghost.weight' is listed in the index"):
        open_checkpoint(d)
    index["weight_map"]["ghost.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="lists shard model-00009-of-00009.safetensors, which is missing"):
        open_checkpoint(d)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(InputError, match="no safetensors weights"):
        open_checkpoint(tmp_path)


def test_peft_target_weight():
    assert (peft_target_weight("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            == "model.layers.0.self_attn.q_proj.weight")
    assert peft_target_weight("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector") \
        == "model.layers.1.mlp.down_proj.weight"
    assert peft_target_weight("base_model.model.score.weight") is None


# --- writer ---------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5 kb") == 1500
    assert parse_size(123) == 123
    with pytest.raises(InputError, match="cannot read size"):
        parse_size("lots")


def test_plan_shards_greedy_in_order():
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 1])]
    plan = plan_shards(specs, 80)  # bytes: 40, 40, 120, 20, 4
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


@pytest.mark.parametrize("max_shard_size", ["40KB", "10GB"])
def test_write_model_dir_loads_in_transformers(models, tmp_path, max_shard_size):
    from transformers import AutoModelForCausalLM

    src = open_checkpoint(models["base-bf16"])
    out = write_model_dir(tmp_path / "out", src.specs(), lambda s: src.load(s.name),
                          max_shard_size=max_shard_size,
                          side_files=model_side_files(models["base-bf16"]), progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "generation_config.json" in files
    if max_shard_size == "10GB":
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in src.specs())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        for shard in shards:  # no shard over the limit unless it holds a single tensor
            entries = open_checkpoint(out / shard).tensors.values()
            assert sum(t.nbytes for t in entries) <= 40_000 or len(entries) == 1
    ref = _reference(models["base-bf16"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_write_failure_leaves_nothing(tmp_path):
    specs = [TensorSpec(f"t{i}", "F32", (100,)) for i in range(5)]

    def get(spec):
        if spec.name == "t3":
            raise RuntimeError("boom")
        return torch.zeros(100)

    with pytest.raises(RuntimeError, match="boom"):
        write_model_dir(tmp_path / "out", specs, get, max_shard_size=800, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_nonempty_dir_and_checks_tensors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = TensorSpec("w", "F32", (2,))
    with pytest.raises(InputError, match="exists and is not empty"):
        write_model_dir(out, [spec], lambda s: torch.zeros(2), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="got BF16"):
        write_model_dir(tmp_path / "o2", [spec], lambda s: torch.zeros(2, dtype=torch.bfloat16),
                        progress=False)
    write_model_dir(out, [spec], lambda s: torch.ones(2), overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
