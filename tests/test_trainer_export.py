"""ONNX export and parity, the TensorRT step's failure mode, publishing, and model_repo configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from features import model_inputs as mi
from m3t.onnx_runtime import onnx_session
from m3t.settings import PROJECT_ROOT
from tests.tiny_model import TINY
from trainer.export import (
    MODELS,
    ParityError,
    TensorRTUnavailable,
    example_inputs,
    export_onnx,
    export_tensorrt,
    graphs,
    onnx_io,
)
from trainer.model import M3TLM, M3TConfig
from trainer.publish import Batching, PublishError, model_config, publish, read_config, versions

SHAPES = {spec.name: spec.shape for spec in mi.input_specs(6, note_tokens=12, cxr_size=16)}
ONNX_TYPES = {np.dtype("float32"): 1, np.dtype("int64"): 7}  # onnx.TensorProto FLOAT, INT64
CONFIG_TYPES = {mc.TYPE_FP32: 1, mc.TYPE_INT64: 7}


def tiny_model(n_features=6, **overrides) -> M3TLM:
    torch.manual_seed(0)
    return M3TLM(M3TConfig(n_features=n_features, vocab_size=30, **{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    out = tmp_path_factory.mktemp("onnx")
    return model, out, export_onnx(model, SHAPES, out)


def test_every_graph_matches_pytorch_within_1e4(exported):
    _, _, report = exported
    assert set(report) == set(MODELS)
    assert all(row["max_abs_diff"] <= 1e-4 for row in report.values())


def test_onnx_encoders_then_fusion_equal_the_onnx_full_model(exported):
    model, out, _ = exported
    g = graphs(model, SHAPES)
    x = example_inputs(g["m3t_lm"].inputs, 9, vocab_size=30, seed=5)
    run = lambda name, feed: onnx_session(out / f"{name}.onnx").run(None, feed)  # noqa: E731
    (emb_numeric,) = run("m3t_enc_numeric", {k: x[k] for k in (mi.NUMERIC, mi.NUMERIC_MASK)})
    emb_radiology, emb_discharge = run(
        "m3t_enc_notes", {k: x[k] for k in (mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE)}
    )
    (emb_cxr,) = run("m3t_enc_cxr", {mi.CXR: x[mi.CXR]})
    fusion_inputs = [s.name for s in g["m3t_fusion"].inputs]
    parts = run(
        "m3t_fusion",
        dict(
            zip(
                fusion_inputs,
                [emb_numeric, emb_radiology, emb_discharge, emb_cxr, x[mi.MODALITY_MASK]],
            )
        ),
    )
    whole = run("m3t_lm", x)
    assert all(np.allclose(p, w, atol=1e-6) for p, w in zip(parts, whole))


def test_onnx_graphs_have_a_dynamic_batch_axis_and_the_shared_names(exported):
    model, out, _ = exported
    for name, graph in graphs(model, SHAPES).items():
        io = onnx_io(out / f"{name}.onnx")
        assert [n for n, _, _ in io["inputs"]] == [s.name for s in graph.inputs]
        assert [n for n, _, _ in io["outputs"]] == [s.name for s in graph.outputs]
        assert all(dims[0] == -1 for _, _, dims in io["inputs"] + io["outputs"])


def test_parity_failure_is_an_error(tmp_path):
    with pytest.raises(ParityError, match="m3t_enc_cxr"):
        export_onnx(tiny_model(), SHAPES, tmp_path, tolerance=-1.0, names=("m3t_enc_cxr",))


def test_tensorrt_missing_is_a_clear_error(exported, tmp_path):
    model, out, _ = exported
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        export_tensorrt(model, SHAPES, out, tmp_path)


def test_tensorrt_cli_exits_2_without_tensorrt(tmp_path):
    from trainer.cli import export_app
    from trainer.synthetic import make_dataset
    from trainer.train import TrainConfig, train

    train(make_dataset(n=60, seed=1), tmp_path, TrainConfig(max_epochs=1), TINY, progress=False)
    result = CliRunner().invoke(export_app, ["tensorrt", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "TensorRT is not installed" in result.output


def test_publish_adds_versions_and_never_overwrites(exported, tmp_path):
    model, out, _ = exported
    g = graphs(model, SHAPES)
    first = publish(g, out, tmp_path)
    second = publish(g, out, tmp_path)
    for name in MODELS:
        assert first[name].name == "1" and second[name].name == "2"
        assert versions(tmp_path / name) == [1, 2]
        assert {p.name for p in second[name].iterdir()} == {"model.onnx", "model.py", "m3t.json"}
    assert not list(tmp_path.glob("*/.staging*"))


def test_publish_refuses_a_config_change_that_would_break_served_versions(exported, tmp_path):
    model, out, _ = exported
    publish(graphs(model, SHAPES), out, tmp_path)
    wider = {**SHAPES, mi.NUMERIC: (7,), mi.NUMERIC_MASK: (7,)}
    with pytest.raises(PublishError, match="differ"):
        publish(graphs(tiny_model(7), wider), out, tmp_path)


def test_generated_configs_declare_batching_and_backend():
    g = graphs(tiny_model(), SHAPES)["m3t_lm"]
    cpu = model_config(g, "python", Batching(max_batch_size=32, preferred_batch_size=(4, 16)))
    assert cpu.backend == "python" and cpu.max_batch_size == 32
    assert list(cpu.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert model_config(g, "onnxruntime").platform == "onnxruntime_onnx"
    assert model_config(g, "tensorrt").platform == "tensorrt_plan"
    # The explanation graph takes only idle CPU; the scoring graphs keep their priority.
    explain = model_config(graphs(tiny_model(), SHAPES)["m3t_explain"], "python")
    assert explain.parameters["nice"].string_value == "19" and "nice" not in cpu.parameters
    with pytest.raises(ValueError):
        Batching(max_batch_size=8, preferred_batch_size=(16,))


def _repo_configs():
    return sorted(p for p in (PROJECT_ROOT / "model_repo").glob("m3t_*/config.pbtxt"))


@pytest.mark.parametrize(
    "path",
    sorted((PROJECT_ROOT / "model_repo").glob("*/config.pbtxt")),
    ids=lambda p: p.parent.name,
)
def test_every_config_in_model_repo_parses(path: Path):
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert config.name == path.parent.name and config.input and config.output


def test_model_repo_has_a_config_for_every_exported_graph():
    assert [p.parent.name for p in _repo_configs()] == sorted(MODELS)


@pytest.mark.parametrize("path", _repo_configs(), ids=lambda p: p.parent.name)
def test_each_repo_config_parses_and_matches_its_onnx_graph(path: Path, tmp_path):
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert config.name == path.parent.name and config.max_batch_size > 0
    assert read_config(path) == config
    published = sorted(
        v / "model.onnx" for v in path.parent.iterdir() if (v / "model.onnx").exists()
    )
    if published:  # versions published into this checkout: check the real graphs
        onnx_files = published
    else:  # a fresh clone has configs only: export the architecture the config describes
        dims = {t.name: list(t.dims) for t in list(config.input) + list(config.output)}
        n_features = dims.get(mi.NUMERIC, [6])[0]
        emb = next((d[0] for n, d in dims.items() if n.startswith("emb_")), 64)
        shapes = {
            **{s.name: s.shape for s in mi.input_specs(n_features)},
            **{n: tuple(d) for n, d in dims.items() if n in {s.name for s in mi.input_specs(1)}},
        }
        model = tiny_model(n_features, emb_dim=emb)
        onnx_files = [
            export_onnx(model, shapes, tmp_path, names=(config.name,))[config.name]["path"]
        ]
    for onnx_file in onnx_files:
        io = onnx_io(onnx_file)
        for declared, actual in ((config.input, io["inputs"]), (config.output, io["outputs"])):
            assert [(t.name, CONFIG_TYPES[t.data_type], (-1, *t.dims)) for t in declared] == actual


def test_repo_configs_fit_the_current_feature_set():
    """The committed configs must describe what `m3t features build` produces; after a
    feature-set change, regenerate them with `m3t export configs --n-features F`."""
    from features.definitions import N_NUMERIC

    config = read_config(PROJECT_ROOT / "model_repo" / "m3t_lm" / "config.pbtxt")
    dims = {t.name: tuple(t.dims) for t in config.input}
    assert dims == {s.name: s.shape for s in mi.input_specs(N_NUMERIC)}


def test_publishing_a_run_retrained_in_place_exports_the_new_checkpoint(tmp_path):
    # Seen: `make demo` twice published the first run's cached ONNX graphs for the second run.
    from trainer.cli import export_app
    from trainer.synthetic import make_dataset
    from trainer.train import TrainConfig, train

    run, repo = tmp_path / "run", tmp_path / "repo"
    data = make_dataset(n=60, seed=1)
    train(data, run, TrainConfig(max_epochs=1), TINY, progress=False)
    args = ["publish", "--run", str(run), "--repo", str(repo)]
    assert CliRunner().invoke(export_app, args).exit_code == 0
    first = (repo / "m3t_lm" / "1" / "model.onnx").read_bytes()
    card = (repo / "m3t_lm" / "1" / "model_card.md").read_text()  # no evaluation yet
    assert "m3t_lm version 1" in card and "Not evaluated" in card
    train(
        data,
        run,
        TrainConfig(max_epochs=1, seed=2),
        {**TINY, "fusion_hidden_dim": 12},
        progress=False,
    )
    assert CliRunner().invoke(export_app, args).exit_code == 0
    second = (repo / "m3t_lm" / "2" / "model.onnx").read_bytes()
    assert second != first
    assert (run / "onnx" / "m3t_lm.onnx").read_bytes() == second


def test_int8_calibration_draws_only_the_runs_training_patients(tmp_path):
    import json

    from trainer.data import rows
    from trainer.export import ExportError, calibration_data, training_patients
    from trainer.synthetic import make_dataset

    data = make_dataset(n=300, seed=2)
    a = data.arrays
    a[mi.NUMERIC][:, 0] = np.arange(len(data))  # each row's number, to find it again
    split = {name: sorted(set(a["subject_id"][a["split"] == name].tolist())) for name in a["split"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    patients = training_patients(tmp_path)
    calibration = calibration_data(data, patients, rows=10_000)
    drawn = calibration[mi.NUMERIC][:, 0].astype(int)
    assert set(a["split"][drawn]) == {"train"}
    assert len(drawn) == int((a["split"] == "train").sum())  # all of them, nothing else
    np.testing.assert_array_equal(calibration[mi.CXR], rows(data, mi.CXR, drawn))
    few = calibration_data(data, patients, rows=64, seed=1)[mi.NUMERIC][:, 0].astype(int)
    assert len(few) == 64 and set(a["split"][few]) == {"train"}
    with pytest.raises(ExportError, match="split.json"):
        training_patients(tmp_path / "elsewhere")
