"""tpu_ops on 8 virtual CPU devices: meshes, sharding rules, sharded denoise, compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
import torch

from helpers import stored_item
from reference import relative_error
from stagediff import stages
from stagediff.errors import StagediffError
from stagediff.plan import make_plan
from stagediff.request import Request
from tpu_ops.compiled_module import CompiledModule
from tpu_ops.mesh import MeshError, make_mesh, parse_mesh_spec
from tpu_ops.sharding import ShardingRuleError, partition_specs

FAMILY_SIZES = {
    "sdxl": dict(height=64, width=64),
    "flux2": dict(height=32, width=32),
    "wan": dict(height=32, width=32, frames=5),
}


@pytest.mark.parametrize("family", FAMILY_SIZES)
@pytest.mark.parametrize("mesh", ["tp=8", "dp=2,tp=4", "fsdp=8"])
def test_sharded_denoise_equals_single_device(eight_devices, tiny_models, tmp_path, family, mesh):
    model = tiny_models(family)
    base = dict(model=str(model), prompts=["a red cat"], seeds=[0, 1], steps=2, backend="torchax", batch_size=2,
                **FAMILY_SIZES[family])
    single = Request(**base, store=str(tmp_path / "single"))
    sharded = Request(**base, store=str(tmp_path / "sharded"), mesh=mesh)
    for request in (single, sharded):  # decode on a mesh: tests/test_decode.py
        stages.encode(make_plan(request))
        stages.denoise(make_plan(request))
    for seed in (0, 1):
        expected, _ = stored_item(single, "a red cat", seed)
        actual, _ = stored_item(sharded, "a red cat", seed)
        assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize(
    "batch_size, model_bytes, expected",
    [
        (1, 10 << 30, "tp=8"),  # one item: every chip on it
        (8, 10 << 30, "dp=8"),  # the model fits a chip: one item per chip
        (2, 10 << 30, "dp=2,tp=4"),  # items as far as the batch divides the chips
        (8, 40 << 30, "tp=8"),  # too big for one chip (FLUX.2-dev on 32 GiB chips)
    ],
)
def test_default_mesh_fits_the_model_and_the_batch(eight_devices, batch_size, model_bytes, expected):
    from tpu_ops.mesh import default_mesh_spec

    spec = default_mesh_spec(8, batch_size, model_bytes, device_bytes=32 << 30)
    assert spec == expected
    assert dict(make_mesh(spec).shape) == parse_mesh_spec(expected)
    assert default_mesh_spec(1, batch_size, model_bytes, device_bytes=32 << 30) is None


def test_each_device_holds_only_its_shard(eight_devices):
    linear = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    inputs = torch.randn(4, 16)
    with torch.no_grad():
        expected = linear(inputs)
    rules = [(r"0\.weight", ("tp", None)), (r"0\.bias", ("tp",)), (r"2\.weight", (None, "tp"))]
    compiled = CompiledModule(linear, mesh=make_mesh("dp=2,tp=4"), rules=rules)
    from torchax.interop import jax_view

    column = jax_view(compiled.jittable.params["0.weight"])
    assert column.sharding.spec == jax.sharding.PartitionSpec("tp", None)
    assert {shard.data.shape for shard in column.addressable_shards} == {(16, 16)}
    row = jax_view(compiled.jittable.params["2.weight"])
    assert {shard.data.nbytes for shard in row.addressable_shards} == {16 * 16 * 4}
    assert torch.allclose(compiled(inputs), expected, atol=1e-5)


def test_rule_matching_no_parameter_is_an_error():
    with pytest.raises(ShardingRuleError, match="match no parameter"):
        partition_specs({"a.weight": (8, 8)}, [(r"a\.weight", ("tp", None)), (r"b\.weight", ("tp", None))], {"tp": 2})


def test_parameter_matched_by_two_rules_is_an_error():
    with pytest.raises(ShardingRuleError, match="matches several rules"):
        partition_specs({"a.weight": (8, 8)}, [(r"a\..*", ("tp", None)), (r".*weight", (None, "tp"))], {"tp": 2})


def test_indivisible_dimensions_stay_replicated_and_fsdp_shards_the_rest():
    specs = partition_specs({"w": (6, 8), "norm": (8,)}, [(r"w", ("tp", None))], {"tp": 4, "fsdp": 2})
    assert specs == {"w": ("fsdp", None), "norm": ("fsdp",)}


@pytest.mark.parametrize("spec", ["tp=3", "dp=2,tp=2", "xx=8", "tp=8,tp=1", ""])
def test_bad_mesh_specs_fail_clearly(spec):
    with pytest.raises(MeshError, match="--mesh"):
        make_mesh(spec) if spec else parse_mesh_spec(spec)


def test_mesh_needs_the_torchax_backend_before_any_artifact(tiny_sdxl, tmp_path):
    # A mesh on the torch backend needs no device to refuse: the request itself does.
    with pytest.raises(StagediffError, match="needs --backend torchax"):
        Request(model=str(tiny_sdxl), prompts=["a cat"], seeds=[0], steps=2, store=str(tmp_path / "store"),
                mesh="tp=8", backend="torch")
    assert not (tmp_path / "store").exists()


def test_a_second_process_compiles_from_the_persistent_cache(tiny_sdxl, tmp_path):
    """Denoise and decode of a new process (another seed, same shapes) compile from the cache."""
    script = textwrap.dedent(
        f"""
        import json
        from stagediff import stages
        from stagediff.plan import make_plan
        from stagediff.request import Request
        from tpu_ops import compile_cache
        import sys
        request = Request(model={str(tiny_sdxl)!r}, prompts=["a cat"], seeds=[int(sys.argv[1])], steps=2,
                          store={str(tmp_path / "store")!r}, backend="torchax")
        plan = make_plan(request)
        stages.encode(plan)
        results = {{"denoise": stages.denoise(plan), "decode": stages.decode(plan)}}
        print(json.dumps({{name: {{"compiles": result.compiles, "hits": result.compile_cache_hits}}
                           for name, result in results.items()}} | {{"misses": compile_cache.stats.misses}}))
        """
    )
    env = {**os.environ, "STAGEDIFF_COMPILE_CACHE": str(tmp_path / "cache"), "XLA_FLAGS": ""}
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", script, str(seed)], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip().splitlines()[-1])
        for seed in (0, 1)
    ]
    for stage in ("denoise", "decode"):
        assert runs[0][stage]["compiles"] == runs[1][stage]["compiles"] == 1
        assert runs[0][stage]["hits"] == 0
        assert runs[1][stage]["hits"] > 0
    assert runs[0]["misses"] > 0
    assert any((tmp_path / "cache").iterdir())


ATTENTION_SHAPES = [(1, 2, 64, 32, 64), (2, 1, 100, 16, 77), (1, 2, 130, 32, 130)]
"""(batch, heads, query length, head dim, key length): block multiples and not."""


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("exp2, k_smoothing", [(True, True), (True, False), (False, True), (False, False)])
def test_flash_attention_equals_reference_attention(shape, exp2, k_smoothing):
    from tpu_ops.attention import AttentionConfig, flash_attention, reference_attention

    batch, heads, q_len, dim, kv_len = shape
    keys = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
    q = jax.random.normal(keys[0], (batch, heads, q_len, dim))
    k = jax.random.normal(keys[1], (batch, heads, kv_len, dim))
    v = jax.random.normal(keys[2], (batch, heads, kv_len, dim))
    out = flash_attention(q, k, v, config=AttentionConfig(32, 48, 16), exp2=exp2, k_smoothing=k_smoothing, interpret=True)
    assert out.shape == q.shape
    assert float(abs(out - reference_attention(q, k, v)).max()) < 1e-5


@pytest.mark.parametrize(
    "mesh, shape, layout",
    [
        ("dp=2,tp=4", (2, 4, 40, 16, 40), ("dp", "tp", ())),  # items over dp, heads over tp
        ("dp=2,tp=4", (1, 4, 96, 16, 100), (None, None, ("dp", "tp"))),  # long sequence, batch 1: dp folded in
        ("tp=8", (2, 3, 48, 16, 50), (None, None, ("tp",))),  # heads tp does not divide
        ("tp=8", (1, 2, 70, 16, 70), (None, None, ("tp",))),  # query length padded to the shard count
        ("fsdp=8", (2, 2, 40, 16, 40), (None, None, ("fsdp",))),
    ],
)
def test_sharded_flash_attention_splits_the_work_and_equals_reference(eight_devices, mesh, shape, layout):
    from tpu_ops.attention import AttentionConfig, attention_layout, reference_attention, sharded_flash_attention

    batch, heads, q_len, dim, kv_len = shape
    config = AttentionConfig(16, 32, 16, sequence_parallel_from=64)
    device_mesh = make_mesh(mesh)
    assert attention_layout(dict(device_mesh.shape), batch, heads, q_len, config) == layout
    keys = jax.random.split(jax.random.PRNGKey(q_len), 3)
    q = jax.random.normal(keys[0], (batch, heads, q_len, dim))
    k = jax.random.normal(keys[1], (batch, heads, kv_len, dim))
    v = jax.random.normal(keys[2], (batch, heads, kv_len, dim))
    out = jax.jit(lambda q, k, v: sharded_flash_attention(q, k, v, mesh=device_mesh, config=config, interpret=True))(
        q, k, v
    )
    assert float(abs(out - reference_attention(q, k, v)).max()) < 1e-5
    if q_len % 8 == 0:  # each device holds its part (a padded query sequence is sliced back, re-laid out)
        batch_axis, heads_axis, sequence_axes = layout
        expected = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec(batch_axis, heads_axis, sequence_axes or None))
        assert out.sharding.is_equivalent_to(expected, out.ndim)


def test_k_smoothing_lowers_bf16_error():
    import jax.numpy as jnp

    from tpu_ops.attention import AttentionConfig, flash_attention, reference_attention

    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (1, 2, 96, 32))
    k = jax.random.normal(keys[1], (1, 2, 96, 32)) + 30.0  # real keys share a large offset
    v = jax.random.normal(keys[2], (1, 2, 96, 32))
    expected = reference_attention(q, k, v)

    def bf16_error(k_smoothing):
        out = flash_attention(q.astype(jnp.bfloat16), k, v, config=AttentionConfig(64, 64, 32), k_smoothing=k_smoothing,
                              interpret=True)
        return float(abs(out.astype(jnp.float32) - expected).max())

    plain, smoothed = bf16_error(False), bf16_error(True)
    assert smoothed < plain / 2, (smoothed, plain)


def test_torchax_models_run_the_flash_kernel_and_equal_torch(eight_devices, tiny_models, tmp_path):
    """SDXL and Wan on one device, and Wan on a dp=2,tp=4 mesh with its two heads split along the
    sequence (tp does not divide them), all through the interpreted kernel."""
    script = textwrap.dedent(
        f"""
        import json, os
        os.environ["STAGEDIFF_ATTENTION"] = "flash-interpret"
        import tpu_ops.attention as attention
        calls, layouts = [], set()
        kernel, layout = attention.flash_attention, attention.attention_layout
        attention.flash_attention = lambda *a, **k: calls.append(1) or kernel(*a, **k)
        attention.attention_layout = lambda *a: layouts.add(str(layout(*a))) or layout(*a)
        attention.FAMILY_ATTENTION["wan"] = attention.AttentionConfig(8, 8, 8, sequence_parallel_from=4)
        from stagediff import stages
        from stagediff.plan import make_plan
        from stagediff.request import Request
        errors = {{}}
        runs = (("sdxl", {str(tiny_models("sdxl"))!r}, {{}}), ("wan", {str(tiny_models("wan"))!r}, {{"frames": 5}}),
                ("wan", {str(tiny_models("wan"))!r}, {{"frames": 5, "mesh": "dp=2,tp=4"}}))
        for family, model, extra in runs:
            latents = {{}}
            for backend in ("torch", "torchax"):
                options = dict(extra) if backend == "torchax" else {{k: v for k, v in extra.items() if k != "mesh"}}
                store = {str(tmp_path)!r} + "/" + family + "-" + backend + str(extra.get("mesh"))
                plan = make_plan(Request(model=model, prompts=["a cat"], seeds=[0], steps=2, height=32, width=32,
                                         store=store, backend=backend, **options))
                stages.encode(plan)
                stages.denoise(plan)
                item = plan.items[0]
                latents[backend] = plan.store.read_tensors(item.latents_path, item.latents_key)["latents"]
            name = family + "@" + str(extra.get("mesh"))
            errors[name] = float((latents["torch"] - latents["torchax"]).abs().max() / latents["torch"].abs().max())
        print(json.dumps({{"errors": errors, "kernel_calls": len(calls), "layouts": sorted(layouts)}}))
        """
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["kernel_calls"] > 0
    assert "('dp', None, ('tp',))" in result["layouts"], result
    assert all(error < 1e-3 for error in result["errors"].values()), result


def test_a_flash_kernel_that_fails_to_compile_falls_back_to_xla_attention(monkeypatch, caplog):
    """Mosaic errors only show on a real TPU: whatever the kernel raises while compiling, the module
    logs it once and runs with plain attention, equal to torch."""
    import logging

    import tpu_ops.attention as attention

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    attempts = []

    def failing_kernel(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("Mosaic failed to compile TPU kernel: unsupported block shape")

    monkeypatch.setenv(attention.ATTENTION_VARIABLE, "flash-interpret")
    monkeypatch.setattr(attention, "flash_attention", failing_kernel)
    module = SelfAttention()
    inputs = [torch.randn(1, 12, 16), torch.randn(2, 20, 16)]
    with torch.no_grad():
        expected = [module(x) for x in inputs]
    compiled = CompiledModule(module)
    with caplog.at_level(logging.WARNING, logger="tpu_ops"):
        outputs = [compiled(x) for x in inputs]
    for output, reference in zip(outputs, expected):
        assert torch.allclose(output, reference, atol=1e-5)
    assert len(attempts) == 1  # the second shape compiled without trying the kernel again
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using XLA attention" in warnings[0] and "Mosaic failed" in warnings[0]
