"""Lossy delta codecs (bit1, compeft): spec examples, independent references, store round trips."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mergehub
from mergehub.errors import IntegrityError, StoreError
from mergehub.hub.cli import cli
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.codecs import LOSSY
from mergehub.storage.store import Store

TAU1 = [0.30, -0.10, 0.05, 0.00, 0.20, -0.60]


def roundtrip(codec: str, theta: torch.Tensor, base: torch.Tensor, **params):
    full = {**LOSSY[codec].defaults, **params}
    header, payload = LOSSY[codec].encode(theta, base, full)
    return header, LOSSY[codec].decode(memoryview(payload), header, base), len(payload)


def test_spec_examples():
    base, tau = torch.zeros(6), torch.tensor(TAU1)
    _, out, _ = roundtrip("compeft", tau, base, density=0.5, alpha=1.0)
    assert torch.allclose(out, torch.tensor([0.2883, 0, 0, 0, 0.2883, -0.2883]), atol=1e-4)
    _, out, _ = roundtrip("bit1", tau, base, granularity="matrix")
    assert torch.allclose(out.abs(), torch.full((6,), 0.2083), atol=1e-4)


def bit1_reference(theta: np.ndarray, base: np.ndarray, granularity: str = "matrix") -> np.ndarray:
    """BitDelta's BinaryDiff: coeff = mean|Δ| (over the matrix, or each row with
    ``granularity="row"``), Δ̂ = +coeff where Δ >= 0, −coeff elsewhere."""
    tau = theta - base
    if granularity == "matrix":
        return base + np.where(tau >= 0, 1.0, -1.0) * np.mean(np.abs(tau))
    out = np.empty_like(tau)
    for r in range(tau.shape[0]):
        s = np.mean(np.abs(tau[r]))
        out[r] = base[r] + np.where(tau[r] >= 0, s, -s)
    return out


def compeft_reference(theta: np.ndarray, base: np.ndarray, density: float, alpha: float) -> np.ndarray:
    """ComPEFT's formula (Yadav et al. 2023): τ̂ = α·σ(τ)·sign(τ) ⊙ m, m the top k of |τ|
    (k = max(1, int(density·n)), ties by position), σ the population std of τ, sign(0) = 0."""
    tau = (theta - base).reshape(-1)
    k = max(1, int(density * tau.size))
    m = np.zeros(tau.size, dtype=bool)
    m[sorted(range(tau.size), key=lambda i: (-abs(tau[i]), i))[:k]] = True
    out = alpha * tau.std() * np.sign(tau) * m
    return (base.reshape(-1) + out).reshape(theta.shape)


def test_bit1_row_option_against_reference_and_two_values_per_row():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(37, 53, generator=gen)
    theta = base + torch.randn(37, 53, generator=gen) * 0.01
    header, out, size = roundtrip("bit1", theta, base, granularity="row")
    ref = bit1_reference(theta.numpy(), base.numpy(), "row")
    assert np.allclose(out.numpy(), ref, atol=1e-6)
    full = {**LOSSY["bit1"].defaults, "granularity": "row"}
    _, payload = LOSSY["bit1"].encode(theta, base, full)
    delta = LOSSY["bit1"].decode(memoryview(payload), header, torch.zeros_like(base))
    for r in range(37):  # two values per scale group: +s and -s
        values = torch.unique(delta[r])
        assert len(values) == 2 and values[0] == -values[1]
    assert size == 37 * 4 + (37 * 53 + 7) // 8  # scales + one bit per weight


@pytest.mark.parametrize("density, layout", [(0.5, "bitmap"), (0.002, "gaps")])
def test_compeft_against_reference_and_layouts(density, layout):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 97, generator=gen)
    tau = torch.randn(64, 97, generator=gen) * 0.02
    tau[3, :5] = 0.0  # exact zeros and ties
    theta = base + tau
    header, out, _ = roundtrip("compeft", theta, base, density=density, alpha=2.5)
    assert header["layout"] == layout
    ref = compeft_reference(theta.numpy(), base.numpy(), density, 2.5)
    assert np.allclose(out.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("density, layout", [(0.5, "bitmap"), (0.002, "gaps")])
def test_compeft_payload_disagreeing_with_its_header_is_refused(density, layout):
    """Positions that name other than ``kept`` distinct entries (a bitmap with a bit too many,
    gaps that repeat a position) are an error, not a decode with shifted signs."""
    import zstandard

    from mergehub.storage.frames import inflate

    gen = torch.Generator().manual_seed(2)
    base = torch.randn(32, 40, generator=gen)
    header, payload = LOSSY["compeft"].encode(base + torch.randn(32, 40, generator=gen), base,
                                             {**LOSSY["compeft"].defaults, "density": density})
    assert header["layout"] == layout
    split = header["positions_bytes"]
    n = 32 * 40
    raw = bytearray(inflate(bytes(payload[:split]), -(-n // 8) if layout == "bitmap"
                            else 4 * header["kept"]))
    if layout == "bitmap":
        i = next(i for i, b in enumerate(raw) if b != 0xFF)
        raw[i] |= (raw[i] + 1) & ~raw[i] & 0xFF  # its lowest clear bit: one entry too many
    else:
        raw[4:8] = bytes(4)  # the second position repeats the first
    bad = zstandard.ZstdCompressor().compress(bytes(raw)) + bytes(payload[split:])
    with pytest.raises(ValueError, match="distinct entries"):
        LOSSY["compeft"].decode(memoryview(bad), {**header, "positions_bytes": len(bad) -
                                                  (len(payload) - split)}, base)


def test_compeft_kept_zeros_decode_to_zero():
    """A 3%-dense delta at density 0.1: the top 10% holds exact zeros, and sign(0) = 0 makes
    each decode to the base's value (they were +alpha·σ), nor are they stored."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 97, generator=gen)
    tau = torch.zeros(64 * 97)
    changed = torch.randperm(tau.numel(), generator=gen)[:int(0.03 * tau.numel())]
    tau[changed] = torch.randn(changed.numel(), generator=gen) * 0.02
    theta = base + tau.reshape(64, 97)
    tau = (theta - base).reshape(-1)  # as rounded in float32
    header, out, _ = roundtrip("compeft", theta, base, density=0.1, alpha=1.0)
    ref = compeft_reference(theta.numpy(), base.numpy(), 0.1, 1.0)
    assert np.allclose(out.numpy(), ref, atol=1e-6)
    zeros = (tau == 0).numpy()
    assert torch.equal(out.reshape(-1)[zeros], base.reshape(-1)[zeros])
    assert header["kept"] == int((tau != 0).sum())


def lowrank_reference(theta: np.ndarray, base: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd((theta - base).astype(np.float64), full_matrices=False)
    return base + (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_lowrank_against_numpy_svd_and_energy():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(48, 33, generator=gen)
    theta = base + torch.randn(48, 33, generator=gen) * 0.05
    for rank in (1, 5, 33):
        header, out, size = roundtrip("lowrank", theta, base, rank=rank)
        assert header["rank"] == rank and size == 4 * rank * (48 + 33)
        assert np.allclose(out.numpy(), lowrank_reference(theta.numpy(), base.numpy(), rank), atol=1e-5)
    sigma = np.linalg.svd((theta - base).numpy().astype(np.float64), compute_uv=False)
    share = np.cumsum(sigma ** 2) / np.sum(sigma ** 2)
    header, _, _ = roundtrip("lowrank", theta, base, rank=0, energy=0.8)
    assert header["rank"] == int(np.searchsorted(share, 0.8)) + 1
    assert header["energy_kept"] >= 0.8


@pytest.fixture
def stocked(models, tmp_path):
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "ft", base="base", progress=False)
        yield store


@pytest.mark.parametrize("codec, params", [("bit1", {}), ("compeft", {"density": 0.2}),
                                           ("lowrank", {"rank": 4})])
def test_store_compress_export_and_merge(stocked, models, tmp_path, codec, params):
    info = stocked.compress("ft", codec, params, progress=False)
    assert info.name == f"ft-{codec}" and info.base == "base" and codec in info.codecs
    assert info.stored_bytes < stocked.show("ft").stored_bytes / 2
    assert info.provenance["codec"] == codec
    out = open_checkpoint(stocked.export(info.name, tmp_path / "out", progress=False))
    base, ft = open_checkpoint(models["base-bf16"]), open_checkpoint(models["ft-mlp"])
    for name in base.tensors:
        b, f = base.load(name).float().numpy(), ft.load(name).float().numpy()
        if "mlp" not in name:
            assert torch.equal(out.load(name), ft.load(name)), name  # unchanged: shared blob
            continue
        ref = (bit1_reference(f, b) if codec == "bit1" else compeft_reference(f, b, 0.2, 1.0)
               if codec == "compeft" else lowrank_reference(f, b, 4))
        expected = torch.from_numpy(ref).to(torch.bfloat16)
        assert (out.load(name).float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max(), name
    assert stocked.verify(progress=False).ok
    merged = mergehub.merge(f"merge_method: task_arithmetic\nbase_model: base\n"
                            f"models: [{{model: {info.name}}}]\n", out=tmp_path / "merged",
                            store=stocked, progress=False)
    m = open_checkpoint(merged.out)
    assert all(torch.equal(m.load(n), out.load(n)) for n in base.tensors)


def bitdelta_selection(model_dir) -> set[str]:
    """The weights BitDelta's ``compress_diff`` replaces, found as its loop finds them: every
    child whose name contains "proj" of a module whose name contains "mlp" or "self_attn"."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {f"{name}.{sub}.weight" for name, module in model.named_modules()
            if "mlp" in name or "self_attn" in name
            for sub, _ in module.named_children() if "proj" in sub}


def test_bit1_default_is_bitdelta_scope_and_one_scale_per_matrix(models, tmp_path):
    """Every tensor of the fine-tune changes (embeddings, norms and head too). BitDelta
    sign-codes the attention and MLP projections with one mean|Δ| scale per matrix and keeps
    the rest exact; ``scope: all`` with ``granularity: row`` (the former default) codes all.
    The rows of each matrix's Δ are scaled 0.25x to 4x, so that a scale per row and one per
    matrix decode far more than a bf16 step apart."""
    from safetensors.torch import load_file, save_file

    from mergehub.hub.demo import make_finetune

    ft = make_finetune(models["base-bf16"], tmp_path / "ft-all", pattern="weight", seed=4)
    weights = load_file(ft / "model.safetensors")
    base_weights = load_file(models["base-bf16"] / "model.safetensors")
    for name, w in weights.items():
        if "norm" in name:  # all ones in the base (std 0, so make_finetune left them): the
            w[-1] += 0.4    # issue's LayerNorm delta [0, ..., 0, 0.4]
        elif w.ndim == 2:
            b = base_weights[name].float()
            ramp = torch.logspace(-2, 2, w.shape[0], base=2.0)[:, None]
            weights[name] = (b + (w.float() - b) * ramp).to(w.dtype)
    save_file(weights, ft / "model.safetensors", metadata={"format": "pt"})
    base, fine = open_checkpoint(models["base-bf16"]), open_checkpoint(ft)
    selected = bitdelta_selection(models["base-bf16"])
    assert selected and selected < set(base.tensors) and "model.norm.weight" not in selected

    def check(out, reference) -> None:
        for name in base.tensors:
            b, f = base.load(name).float().numpy(), fine.load(name).float().numpy()
            assert not np.array_equal(b, f), name  # the fine-tune changed every tensor
            ref = reference(name, b, f)
            if ref is None:
                assert torch.equal(out.load(name), fine.load(name)), name  # kept exact
                continue
            expected = torch.from_numpy(ref).to(torch.bfloat16).float()
            # rounded to bf16 from float32 here and from float64 there: at most one bf16
            # step (2^-7 of the value) apart, element by element
            assert ((out.load(name).float() - expected).abs()
                    <= 2 ** -7 * expected.abs()).all(), name

    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(ft, "ft", base="base", progress=False)
        store.compress("ft", "bit1", progress=False)
        check(open_checkpoint(store.export("ft-bit1", tmp_path / "bd", progress=False)),
              lambda name, b, f: bit1_reference(f, b) if name in selected else None)
        store.compress("ft", "bit1", {"granularity": "row", "scope": "all"}, as_name="ft-all",
                       progress=False)
        check(open_checkpoint(store.export("ft-all", tmp_path / "all", progress=False)),
              lambda name, b, f: bit1_reference(f, b, "row" if b.ndim == 2 else "matrix"))
        store.compress("ft", "bit1", {"scope": "linear"}, as_name="ft-linear", progress=False)
        check(open_checkpoint(store.export("ft-linear", tmp_path / "lin", progress=False)),
              lambda name, b, f: bit1_reference(f, b) if name in selected else None)
        with pytest.raises(StoreError, match="bit1 scope must be 'bitdelta' or 'linear' or "
                                             "'all', not 'at'"):
            store.compress("ft", "bit1", {"scope": "at"}, progress=False)


def test_bit1_linear_scope_selects_a_bert_encoders_linear_layers():
    """scope linear: exactly the weights of the nn.Linear modules inside BERT's numbered
    encoder layers (not the embeddings, the pooler, the classifier, norms or biases); BitDelta's
    name rule selects none of them."""
    import transformers

    from mergehub.storage.codecs.bit1 import applies

    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16)
    model = transformers.BertForSequenceClassification(config)
    linear = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layer." in name}
    assert len(linear) == 12
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    params = {"granularity": "matrix"}
    assert {n for n, s in shapes.items() if applies(n, s, {**params, "scope": "linear"})} == linear
    assert not any(applies(n, s, {**params, "scope": "bitdelta"}) for n, s in shapes.items())


def test_compressed_blob_corruption_and_errors(stocked, tmp_path):
    stocked.compress("ft", "bit1", progress=False)
    name, blob = stocked._db.execute(
        "SELECT t.name, t.blob FROM tensors t JOIN blobs b ON b.id = t.blob "
        "WHERE b.codec = 'bit1' LIMIT 1").fetchone()
    path = stocked._blob_path(blob)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"model 'ft-bit1', tensor '{name}': blob .* corrupt"):
        stocked.export("ft-bit1", tmp_path / "o", progress=False)
    with pytest.raises(StoreError, match="unknown codec 'nope'"):
        stocked.compress("ft", "nope", progress=False)
    with pytest.raises(StoreError, match="codec compeft has no parameter 'densty'"):
        stocked.compress("ft", "compeft", {"densty": 0.1}, progress=False)
    with pytest.raises(StoreError, match="'base' has no base"):
        stocked.compress("base", "bit1", progress=False)
    with pytest.raises(StoreError, match="'ft-bit1' already exists"):
        stocked.compress("ft", "bit1", progress=False)


@pytest.mark.parametrize("codec, damage", [("bit1", "swap"), ("bit1", "flip"),
                                           ("compeft", "swap"), ("compeft", "flip")])
def test_the_device_read_checks_a_lossy_blob_as_the_cpu_read_does(stocked, codec, damage):
    """The read that decodes a lossy blob on a device (``StoredModel.load`` on a GPU), run
    here on CPU tensors: an intact blob decodes to the CPU read's bytes; a blob file swapped
    for another valid blob (its header names another original) is refused as the CPU read
    refuses it, and a payload with a flipped bit by the hash of the stored blob (the device
    read checks the small stored blob against its id, not the decoded tensor, which would
    have to come back from the device), both naming model and tensor."""
    stocked.compress("ft", codec, progress=False)
    model = stocked.open(f"ft-{codec}")
    (name, blob), (_, other) = stocked._db.execute(
        "SELECT t.name, t.blob FROM tensors t JOIN blobs b ON b.id = t.blob JOIN models m ON "
        "m.id = t.model_id WHERE b.codec = ? AND m.name = ? AND t.name LIKE "
        "'%gate_proj.weight' ORDER BY t.name LIMIT 2", (codec, model.name)).fetchall()
    size = next(s.nbytes for s in model.specs() if s.name == name)  # two layers': one shape
    what = f"model 'ft-{codec}', tensor {name!r}"
    cpu = torch.device("cpu")
    decoded = stocked._decode_on(blob, what, cpu, size)
    assert bytes(decoded.view(torch.uint8).numpy()) == bytes(model.read_bytes(name))
    path = stocked._blob_path(blob)
    if damage == "swap":
        path.write_bytes(stocked._blob_path(other).read_bytes())
        expected = "its header disagrees with the catalog"
    else:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
        expected = "decodes to bytes whose sha256 does not match the original"
    with pytest.raises(IntegrityError) as on_cpu:
        model.read_bytes(name)
    with pytest.raises(IntegrityError) as on_device:
        stocked._decode_on(blob, what, cpu, size)
    assert expected in str(on_cpu.value)
    if damage == "swap":
        assert str(on_device.value) == str(on_cpu.value)
    else:
        assert str(on_device.value).startswith(f"{what}: blob {blob[:16]} is corrupt (its "
                                               "sha256 does not match")


def test_finetune_of_a_compressed_entry(stocked, models, tmp_path):
    stocked.compress("ft", "compeft", {"density": 0.3}, progress=False)
    stocked.add(models["ft-attn"], "child", base="ft-compeft", progress=False)
    out = stocked.export("child", tmp_path / "child", progress=False)
    from mergehub.hub.demo import dir_digests
    assert dir_digests(out) == dir_digests(models["ft-attn"])
    assert stocked.verify(progress=False).ok


def test_cli_compress(stocked):
    runner = CliRunner()
    args = ["--store", str(stocked.root)]
    res = runner.invoke(cli, [*args, "compress", "ft", "-c", "compeft", "-p", "density=0.05",
                              "--as", "ft-small"])
    assert res.exit_code == 0 and "compressed 'ft-small'" in res.output, res.output
    shown = runner.invoke(cli, [*args, "show", "ft-small"]).output
    assert "codec compeft:" in shown and '"codec_params": {"alpha": 1.0, "density": 0.05}' in shown
    res = runner.invoke(cli, [*args, "compress", "ft", "-c", "bit1", "-p", "oops"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output


# --- TALL masks -------------------------------------------------------------------------------

def test_tall_spec_example():
    """The spec's example through the path ``Store.compress_tall`` takes: the codec's encode
    (masks), task 1's blob as the store writes it, decoded as the store reads it."""
    from mergehub.storage.blob_format import unpack_blob
    from mergehub.storage.codecs.tall import TALL
    from mergehub.storage.lossy_blobs import decode_blob, encode_task_blob

    base = torch.tensor([0.50, -0.20, 0.10, 0.00, 0.30, -0.40])
    taus = [torch.tensor(t) for t in (TAU1, [-0.40, 0.20, 0.01, 0.10, -0.05, -0.30],
                                      [0.10, 0.50, -0.02, -0.30, 0.15, 0.02])]
    params = {"lambda": 0.4, "alpha": 1.0}
    encoded = TALL.encode(taus, [params] * 3)
    assert [code["mask"].int().tolist() for code in encoded.codes] == \
        [[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1], [1, 1, 0, 1, 1, 0]]
    mtl = encoded.shared["mtl"]
    blob = encode_task_blob("tall", encoded.codes[0], params, (6,), "F32",
                            ("b" * 64, base.numpy().tobytes()), {"mtl": ("m" * 64, mtl)})
    header, payload = unpack_blob(blob)
    assert header.params["needs"] == {"mtl": "m" * 64} and header.ref == "b" * 64
    out = decode_blob(header, payload, base.numpy().tobytes(), {"mtl": mtl.numpy().tobytes()})
    assert np.allclose(np.frombuffer(out, np.float32), [0.50, -0.20, 0.14, 0.00, 0.60, -1.28],
                       atol=1e-6)


def test_store_compress_tall(stocked, models, tmp_path):
    stocked.add(models["ft-attn"], "attn", base="base", progress=False)
    stocked.add(models["ft-sharded"], "sharded", base="base", progress=False)
    names = ["ft", "attn", "sharded"]
    dense = sum(stocked.show(n).stored_bytes for n in names)
    infos = stocked.compress_tall(names, {"lambda": [0.4, 0.3, 0.5]}, progress=False)
    assert [i.name for i in infos] == ["ft-tall", "attn-tall", "sharded-tall"]
    disk_tall = sum(i.codecs.get("tall", {}).get("stored_bytes", 0) for i in infos)
    assert disk_tall < dense / 4  # masks are 1 bit per weight
    base = open_checkpoint(models["base-bf16"])
    fts = [open_checkpoint(models[k]) for k in ("ft-mlp", "ft-attn", "ft-sharded")]
    stocked.gc()  # the shared multi-task vectors are referenced only through blob headers
    for i, (name, lam) in enumerate(zip(names, [0.4, 0.3, 0.5])):
        out = open_checkpoint(stocked.export(f"{name}-tall", tmp_path / name, progress=False))
        for tname in base.tensors:
            b = base.load(tname).float().numpy()
            taus = [f.load(tname).float().numpy() - b for f in fts]
            if not taus[i].any():
                assert torch.equal(out.load(tname), fts[i].load(tname))
                continue
            mtl = np.sum(taus, axis=0)
            expected = b + np.where(np.abs(taus[i]) > lam * np.abs(mtl - taus[i]), mtl, 0)
            got = out.load(tname).float().numpy()
            assert np.allclose(got, expected, atol=2 ** -7 * np.abs(expected).max()), tname
    assert stocked.verify(progress=False).ok
    for name in names:
        stocked.rm(f"{name}-tall")
    before = stocked.disk_bytes()
    stocked.gc()
    assert stocked.disk_bytes() < before  # the multi-task vectors go with the last user
    assert stocked.verify(progress=False).ok


def test_tall_errors_and_cli(stocked, models):
    stocked.add(models["base-fp32"], "other-base", progress=False)
    stocked.add(models["base-fp32"], "other-ft", base="other-base", progress=False)
    with pytest.raises(StoreError, match="one and the same base"):
        stocked.compress_tall(["ft", "other-ft"], progress=False)
    with pytest.raises(StoreError, match="two or more"):
        stocked.compress_tall(["ft"], progress=False)
    with pytest.raises(StoreError, match=r"use Store\.compress_tall\(\[A, B, \.\.\.\]\)$"):
        stocked.compress("ft", "tall", progress=False)
    stocked.add(models["ft-attn"], "attn", base="base", progress=False)
    with pytest.raises(StoreError, match="3 lambdas for 2"):
        stocked.compress_tall(["ft", "attn"], {"lambda": [0.1, 0.2, 0.3]}, progress=False)
    # values TALL cannot use, one or per task: one line naming the parameter, nothing added
    for bad, shown in [({"lambda": None}, "lambda must be a finite number, not None"),
                       ({"lambda": [0.3, None]}, "lambda must be a finite number, not None"),
                       ({"lambda": [0.3, {"a": 1}]},
                        "lambda must be a finite number, not {'a': 1}"),
                       ({"alpha": "x"}, "alpha must be a finite number, not 'x'"),
                       ({"alpha": [1, 2]}, "alpha must be a finite number, not [1, 2]"),
                       ({"lamda": 0.3}, "codec tall has no parameter 'lamda'")]:
        with pytest.raises(StoreError, match=re.escape(shown)):
            stocked.compress_tall(["ft", "attn"], bad, progress=False)
    assert not any(i.name.endswith("-tall") for i in stocked.ls())
    res = CliRunner().invoke(cli, ["--store", str(stocked.root), "compress", "ft", "attn",
                                   "-c", "tall", "-p", "lambda=null"])
    assert res.exit_code == 2 and res.output.strip() == \
        "error: tall lambda must be a finite number, not None", res.output
    res = CliRunner().invoke(cli, ["--store", str(stocked.root), "compress", "ft", "attn",
                                   "-c", "tall", "-p", "lambda=[0.3,0.5]"])
    assert res.exit_code == 0 and "compressed 'attn-tall'" in res.output, res.output


def test_compress_search_keeps_the_best_alpha(stocked, models):
    """The callback scores each exported candidate; here: closeness to the true fine-tune."""
    ft = open_checkpoint(models["ft-mlp"])
    name = "model.layers.0.mlp.up_proj.weight"
    target = ft.load(name).float()

    def evaluate(path):
        return -float((open_checkpoint(path).load(name).float() - target).norm())

    info, tried = stocked.compress_search("ft", "compeft", {"alpha": [0.25, 1.0, 4.0, 16.0]},
                                          evaluate, {"density": 0.3}, progress=False)
    assert [t[0]["alpha"] for t in tried] == [0.25, 1.0, 4.0, 16.0]
    best = max(tried, key=lambda t: t[1])[0]["alpha"]
    assert info.name == "ft-compeft" and info.provenance["codec_params"]["alpha"] == best
    assert [m.name for m in stocked.ls()] == ["base", "ft", "ft-compeft"]
    scores = dict((t[0]["alpha"], t[1]) for t in tried)
    assert scores[best] > scores[16.0]  # a huge alpha overshoots


def test_compressing_an_adapter_is_refused(stocked, models):
    stocked.add(models["lora"], "lora", base="base", progress=False)
    with pytest.raises(StoreError, match="no tensor to compress with bit1.*LoRA factors"):
        stocked.compress("lora", "bit1", progress=False)
    assert "lora-bit1" not in stocked
