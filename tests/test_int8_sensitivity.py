"""bench/int8_sensitivity.py and the module paths it keeps float (calibration.backends)."""
from pathlib import Path

import onnx

from calibration.backends import module_nodes, module_of, weighted_modules
from calibration.quantize import load_patches
from runtime.bundle import load_bundle
from runtime.data import read_image_list

from bench_module import load_bench

S = load_bench("int8_sensitivity")


def test_module_paths_name_the_same_matmuls_in_every_form(tiny_bundle):
    assert module_of("/blocks.3/mlp/c_fc/MatMul") == "blocks.3/mlp/c_fc"
    assert module_of("/model/blocks.3/mlp/c_fc/MatMul_1") == "blocks.3/mlp/c_fc"
    assert module_of("/MatMul") == module_of("/model/MatMul") == ""
    bundle = load_bundle(tiny_bundle)
    forms = [bundle.level_path(0), bundle.body_path(), bundle.full_path()]
    for path in forms:
        mods = weighted_modules(path)
        assert "blocks.0/mlp/c_fc" in mods and "blocks.0/attn/out_proj" in mods
        nodes = module_nodes(path, ["blocks.0/attn"])  # the qkv projection, not out_proj nor the other blocks
        graph = onnx.load(str(path), load_external_data=False).graph
        assert nodes and all(module_of(n) == "blocks.0/attn" for n in nodes)
        assert len(nodes) == sum(module_of(n.name) == "blocks.0/attn" for n in graph.node if n.op_type == "MatMul")
    assert S.groups(["patch_embed.0/x", "blocks.0/attn", "blocks.0/mlp/c_fc", "blocks.1/attn", "MatMul"]) == {
        "MLPs": ["blocks.0/mlp/c_fc"], "attention": ["blocks.0/attn", "blocks.1/attn"],
        "blocks < 1": ["blocks.0/attn", "blocks.0/mlp/c_fc"], "blocks >= 1": ["blocks.1/attn"],
        "every module": ["patch_embed.0/x", "blocks.0/attn", "blocks.0/mlp/c_fc", "blocks.1/attn", "MatMul"]}


def test_keeping_every_module_float_agrees_fully_and_int8_less(tiny_bundle, sample_images, tmp_path):
    bundle = load_bundle(tiny_bundle)
    records = read_image_list(str(sample_images[0].parent))
    patches = [load_patches(r, bundle.preprocessing, "images", "test", progress=False)[0]
               for r in (records[:8], records)]
    s = S.Sensitivity(bundle, *patches, "minmax", tmp_path)
    modules = list(dict.fromkeys(m for k in range(bundle.num_levels) for m in weighted_modules(bundle.level_path(k))))
    assert s.agreement(modules) == [1.0] * bundle.num_levels  # nothing quantized: fp32's answers
    quantized = list(tmp_path.glob("level*.int8.onnx"))
    assert quantized and not any(n.op_type == "DequantizeLinear"
                                 for n in onnx.load(str(quantized[0]), load_external_data=False).graph.node)
    assert all(0 < a <= 1 for a in s.agreement([]))
    graph = onnx.load(str(tmp_path / "level0.int8.onnx"), load_external_data=False).graph
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)  # the all-int8 variant quantized something


def test_cli_prints_the_table_and_refuses_bad_input(tiny_bundle, sample_images, capsys, tmp_path):
    folder = str(sample_images[0].parent)
    assert S.main([str(tiny_bundle), "--data", folder, "--samples", "8", "--limit", "8", "--method", "minmax"]) == 0
    out = capsys.readouterr().out
    assert "| none (all int8) |" in out and "| every module |" in out and "| MLPs |" in out
    assert S.main([str(tmp_path / "missing"), "--data", folder]) == 2
    assert "error:" in capsys.readouterr().err
