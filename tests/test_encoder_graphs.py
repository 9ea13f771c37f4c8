"""The tokenizer side as ONNX: the Whisper encoder, VQ encoder (argmin in the runtime, fp32) and adaptor graphs, and
the torch-free OnnxAudioTokenizer. Ids must equal the official fixture ids and the golden pipeline's exactly;
hidden states and features within the MANIFEST's fp32 threshold. Every graph is exported once per session."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from kimia_edge.export.bundle import BundleWriter
from kimia_edge.export.exporter import model_config
from kimia_edge.export.graphs import graph_spec
from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, ExportResult, GraphSpec, compare, export_graph
from kimia_edge.export.graphs.base import run_onnx, run_torch
from kimia_edge.quantization.variants import make_variant
from kimia_edge.export.reference.glm_vq import extract_speech_token, vector_quantize
from kimia_edge.export.reference.pipeline import GoldenPipeline
from kimia_edge.export.snapshot.audio_encoders import GLM_TOKENIZER_SUBDIR
from kimia_edge.export.snapshot.make import make_snapshot
from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_tokenizer import (
    OnnxAudioTokenizer,
    kept_positions,
    nearest_codebook_rows,
    vq_segment_inputs,
)
from kimia_edge.runtime.sessions import open_file_session
from kimia_edge.runtime.spec.graphs import VQ_CODEBOOK

torch.set_num_threads(1)

# MANIFEST.md §10: 1e-4 abs on Whisper / GLM hidden states for an fp32 re-implementation.
# Measured here: Whisper graph vs official 3.9e-6, VQ pre-VQ vs official 1.7e-6, tokenizer features vs golden 5.8e-6.
HIDDEN_ATOL = 1e-4
# Log-mel: numpy front end (float64 math) vs the official torch extractor (float32), O(1) values; measured 1.8e-5.
MEL_ATOL = 1e-4
# Official features are bf16 (KimiAPromptManager casts the encoder): indicative only, as in test_audio_encoders.py.
BF16_ATOL = 0.06
SPEECH_CLIPS = ("asr_example_zh.wav", "qa_example.wav")
CALIBRATION_CLIP = "qa_example.wav"  # int8_qdq calibrates on this clip; flips are reported on every clip
VARIANTS = ("fp16", "int8_dynamic", "int8_qdq")


class Exported(NamedTuple):
    spec: GraphSpec
    module: torch.nn.Module
    result: ExportResult

    @property
    def path(self) -> Path:
        return self.result.path


def _export(names: List[str], snapshot: Path, out: Path) -> Dict[str, Exported]:
    done = {}
    for name in names:
        spec = graph_spec(name)
        module = spec.build(snapshot)
        done[name] = Exported(spec, module, export_graph(spec, module, out / f"{name}.fp32.onnx"))
    return done


def _tokenizer(graphs: Dict[str, Exported], vq_path: Optional[Path] = None) -> OnnxAudioTokenizer:
    vq = graphs["vq_encoder"]
    adaptor = graphs.get("adaptor")
    return OnnxAudioTokenizer(
        vq=open_file_session(vq_path or vq.path, threads=1),
        whisper=open_file_session(graphs["whisper_encoder"].path, threads=1),
        codebook=vq.spec.sidecar_arrays(vq.module)[VQ_CODEBOOK],
        vq_config=vq.module.cfg,
        whisper_config=graphs["whisper_encoder"].module.cfg,
        adaptor=open_file_session(adaptor.path, threads=1) if adaptor else None,
    )


# ---- session fixtures: each graph exported once -------------------------------------------------------------------
@pytest.fixture(scope="session")
def fixture_snapshot(official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder in our snapshot layout over the official fixture encoders (symlinks)."""
    root = tmp_path_factory.mktemp("fixture_snapshot")
    (root / "whisper-large-v3").symlink_to(official_fixtures / "kimia_snapshot" / "whisper-large-v3")
    (root / GLM_TOKENIZER_SUBDIR).symlink_to(official_fixtures / "glm-4-voice-tokenizer")
    return root


@pytest.fixture(scope="session")
def fixture_graphs(fixture_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Exported]:
    return _export(["whisper_encoder", "vq_encoder"], fixture_snapshot, tmp_path_factory.mktemp("fixture_graphs"))


@pytest.fixture(scope="session")
def fixture_tokenizer(fixture_graphs: Dict[str, Exported]) -> OnnxAudioTokenizer:
    return _tokenizer(fixture_graphs)


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_snapshot(tmp_path_factory.mktemp("enc_snap") / "tiny", "tiny", seed=23)


@pytest.fixture(scope="session")
def tiny_graphs(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Exported]:
    return _export(["whisper_encoder", "vq_encoder", "adaptor"], tiny_snapshot, tmp_path_factory.mktemp("tiny_graphs"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_graphs: Dict[str, Exported]) -> OnnxAudioTokenizer:
    return _tokenizer(tiny_graphs)


@pytest.fixture(scope="session")
def golden(tiny_snapshot: Path) -> GoldenPipeline:
    return GoldenPipeline(tiny_snapshot)


@pytest.fixture(scope="session")
def speech(shared_audio: Path) -> Dict[str, np.ndarray]:
    return {name: fe.to_16k_mono(*fe.load_audio(shared_audio / name)) for name in SPEECH_CLIPS}


@pytest.fixture(scope="session")
def waves(official_fixtures: Path) -> Dict[str, np.ndarray]:
    return load_file(str(official_fixtures / "audio" / "waves_16k.safetensors"))


@pytest.fixture(scope="session")
def glm_io(official_fixtures: Path) -> Dict[str, np.ndarray]:
    return load_file(str(official_fixtures / "glm_vq" / "io.safetensors"))


@pytest.fixture(scope="session")
def whisper_io(official_fixtures: Path) -> Dict[str, np.ndarray]:
    return load_file(str(official_fixtures / "whisper_lv3" / "io.safetensors"))


# ---- fp32 graphs vs torch -----------------------------------------------------------------------------------------
# Shapes besides the export's own parity lengths: the VQ graph at its minimum (8 frames = 1 token) and at 10 s;
# the adaptor at 2 and at its profile maximum; the (static) Whisper graph on one more seeded input.
EXTRA_SHAPES = {"whisper_encoder": (fe.N_FRAMES,), "vq_encoder": (8, 1000), "adaptor": (2, 1500)}


@pytest.mark.parametrize("name", ["whisper_encoder", "vq_encoder", "adaptor"])
def test_fp32_graph_matches_torch_at_several_shapes(name: str, fixture_graphs: Dict[str, Exported],
                                                    tiny_graphs: Dict[str, Exported]) -> None:
    for graphs in ([fixture_graphs] if name in fixture_graphs else []) + [tiny_graphs]:
        g = graphs[name]
        assert len(g.spec.parity_lengths) >= 2 and g.result.fp32_error.within(g.spec.fp32_tolerance)
        for i, length in enumerate(EXTRA_SHAPES[name]):
            x = g.spec.example_inputs(g.module, length, seed=100 + i)
            err = compare(g.spec, run_onnx(g.path, g.spec, x), run_torch(g.module, x))
            assert err.within(g.spec.fp32_tolerance), f"{name} at {length}: {err}"


def test_whisper_graph_is_static_and_vq_graph_rejects_unaligned_frames(tiny_graphs: Dict[str, Exported]) -> None:
    whisper, vq = tiny_graphs["whisper_encoder"], tiny_graphs["vq_encoder"]
    with pytest.raises(ValueError, match="static"):
        whisper.spec.example_inputs(whisper.module, 1500, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        vq.spec.example_inputs(vq.module, 100, 0)
    assert all(p.min == p.opt == p.max for p in whisper.spec.profiles(whisper.module).values())
    mel = vq.spec.profiles(vq.module)["mel"]
    assert (mel.min[2], mel.max[2]) == (8, fe.N_FRAMES)


# ---- official fixtures ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wave", ["A", "B", "C"])  # C is 31 s: a 30 s and a 1 s segment, batched and padded together
def test_ids_equal_the_official_fixture(fixture_tokenizer: OnnxAudioTokenizer, waves, glm_io, wave: str) -> None:
    expected = glm_io[f"single.{wave}.token_ids"].reshape(-1)
    ids = fixture_tokenizer.semantic_ids(waves[wave])
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(fixture_tokenizer.encode(waves[wave]).semantic_ids, expected)


def test_vq_inputs_are_the_official_padded_batch(fixture_tokenizer: OnnxAudioTokenizer, waves, glm_io) -> None:
    """One batch [A, B, C 0-30 s, C 30-31 s]: every row padded to 3000 frames, masks exact, mel within MEL_ATOL."""
    segments = [waves["A"], waves["B"], *fe.segment_30s(waves["C"])]
    rows = vq_segment_inputs(segments, fixture_tokenizer.vq_config)
    np.testing.assert_array_equal(np.stack([m for _, m in rows]), glm_io["batched.attention_mask"])
    np.testing.assert_allclose(np.stack([mel for mel, _ in rows]), glm_io["batched.input_features"], atol=MEL_ATOL, rtol=0)
    single = vq_segment_inputs([waves["A"]], fixture_tokenizer.vq_config)[0]
    np.testing.assert_array_equal(single[1], glm_io["single.A.attention_mask"][0])
    np.testing.assert_allclose(single[0], glm_io["single.A.input_features"][0], atol=MEL_ATOL, rtol=0)


def test_pre_vq_and_runtime_argmin_reproduce_the_official_quantizer(fixture_tokenizer: OnnxAudioTokenizer, glm_io) -> None:
    """On the official features: the graph's pooled states within HIDDEN_ATOL, and the numpy fp32 argmin gives the
    official raw ids at every position (padding included); the kept positions give the official token lists."""
    kept = []
    for row in range(glm_io["batched.input_features"].shape[0]):
        mask = glm_io["batched.attention_mask"][row]
        pooled = fixture_tokenizer.pre_vq(glm_io["batched.input_features"][row], mask)
        np.testing.assert_allclose(pooled, glm_io["batched.pooled_preVQ"][row], atol=HIDDEN_ATOL, rtol=0)
        official_ids = nearest_codebook_rows(glm_io["batched.pooled_preVQ"][row], fixture_tokenizer.codebook)
        np.testing.assert_array_equal(official_ids, glm_io["batched.raw_token_ids"][row])
        ids = nearest_codebook_rows(pooled, fixture_tokenizer.codebook, fixture_tokenizer.codebook_sq)
        np.testing.assert_array_equal(ids, glm_io["batched.raw_token_ids"][row])
        kept.append(ids[kept_positions(mask, fixture_tokenizer.vq_config)])
    for wave, parts in (("A", kept[0:1]), ("B", kept[1:2]), ("C", kept[2:4])):
        np.testing.assert_array_equal(np.concatenate(parts), glm_io[f"batched.{wave}.token_ids"])


def test_whisper_graph_matches_the_official_segments(fixture_tokenizer: OnnxAudioTokenizer, whisper_io) -> None:
    for key in ("A.seg0", "C.seg0", "C.seg1"):
        (hidden,) = fixture_tokenizer.whisper.run({"mel": whisper_io[f"fp32.{key}.mel"][None]})
        np.testing.assert_allclose(hidden, whisper_io[f"fp32.{key}.last_hidden_state"], atol=HIDDEN_ATOL, rtol=0)


@pytest.mark.parametrize("wave", ["A", "C"])
def test_features_match_the_official_prompt_features(fixture_tokenizer: OnnxAudioTokenizer, waves, whisper_io,
                                                     wave: str) -> None:
    """Shapes exact ([N, 4d], C = 375 + 13 rows over two segments); values vs the official bf16 run (indicative)."""
    feats = fixture_tokenizer.features(waves[wave])
    official = whisper_io[f"bf16.{wave}.extract_whisper_feat"][0]
    assert feats.shape == official.shape and feats.dtype == np.float32
    np.testing.assert_allclose(feats, official, atol=BF16_ATOL, rtol=0)
    frames = fixture_tokenizer.whisper_frames(waves[wave])
    np.testing.assert_array_equal(feats[1, :frames.shape[1]], frames[4])  # row t = frames 4t .. 4t+3


# ---- golden pipeline on real speech -------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", SPEECH_CLIPS)
def test_tokenizer_equals_the_golden_pipeline_on_speech(tiny_tokenizer: OnnxAudioTokenizer, golden: GoldenPipeline,
                                                        speech, clip: str) -> None:
    ref = golden.encode_audio(speech[clip])
    got = tiny_tokenizer.encode(speech[clip])
    np.testing.assert_array_equal(got.semantic_ids, ref.semantic_ids)
    assert got.features.shape == ref.features.shape
    np.testing.assert_allclose(got.features, ref.features, atol=HIDDEN_ATOL, rtol=0)


def test_speech_longer_than_30s_is_segmented_like_the_golden_pipeline(tiny_tokenizer: OnnxAudioTokenizer,
                                                                      golden: GoldenPipeline, speech) -> None:
    clip = np.concatenate([speech["asr_example_zh.wav"]] * 4)[: fe.N_SAMPLES + 3 * fe.SAMPLES_PER_TOKEN + 17]
    ref, got = golden.encode_audio(clip), tiny_tokenizer.encode(clip)
    assert got.semantic_ids.shape == (375 + 4,)
    np.testing.assert_array_equal(got.semantic_ids, ref.semantic_ids)
    np.testing.assert_allclose(got.features, ref.features, atol=HIDDEN_ATOL, rtol=0)


def test_adaptor_graph_equals_the_llm_adaptor_on_speech_features(tiny_tokenizer: OnnxAudioTokenizer,
                                                                 golden: GoldenPipeline, speech) -> None:
    feats = tiny_tokenizer.features(speech["qa_example.wav"])
    with torch.inference_mode():
        ref = golden.llm.model.vq_adaptor(torch.from_numpy(feats)).float().numpy()
    got = tiny_tokenizer.adapt(feats)
    assert got.shape == (feats.shape[0], golden.llm.config.hidden_size)
    assert ErrorStats.of(got, ref).within(graph_spec("adaptor").fp32_tolerance)


# ---- the runtime argmin ------------------------------------------------------------------------------------------
def test_numpy_argmin_equals_the_reference_vector_quantize() -> None:
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((300, 16)).astype(np.float32)
    codebook[7] = codebook[3]  # an exact tie: the lowest id wins, as torch.min
    picks = rng.integers(0, 300, 200)
    hidden = codebook[picks] + 0.3 * rng.standard_normal((200, 16)).astype(np.float32)
    ids = nearest_codebook_rows(hidden, codebook)
    np.testing.assert_array_equal(ids, vector_quantize(torch.from_numpy(hidden), torch.from_numpy(codebook)).numpy())
    assert 7 not in set(nearest_codebook_rows(codebook[[3, 7]], codebook).tolist())
    with pytest.raises(ValueError, match=r"hidden \[n, d\]"):
        nearest_codebook_rows(hidden[:, :8], codebook)


def test_tokenizer_rejects_bad_inputs(tiny_tokenizer: OnnxAudioTokenizer, tiny_graphs: Dict[str, Exported]) -> None:
    with pytest.raises(ValueError, match="mono 16 kHz"):
        tiny_tokenizer.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="mono 16 kHz"):
        tiny_tokenizer.encode(np.zeros((100, 2), np.float32))
    cfg = tiny_tokenizer.vq_config
    with pytest.raises(ValueError, match="codebook: expected shape"):
        OnnxAudioTokenizer(tiny_tokenizer.vq, tiny_tokenizer.whisper, np.zeros((cfg.quantize_vocab_size, 3)),
                           cfg, tiny_tokenizer.whisper_config)
    # the manifest's dict form of the configs (runtime/pipeline.py passes model["vq_encoder"], ...)
    no_adaptor = OnnxAudioTokenizer(tiny_tokenizer.vq, tiny_tokenizer.whisper, tiny_tokenizer.codebook,
                                    dataclasses.asdict(cfg), dataclasses.asdict(tiny_tokenizer.whisper_config))
    assert no_adaptor.vq_config == cfg and no_adaptor.whisper_config == tiny_tokenizer.whisper_config
    with pytest.raises(ValueError, match="without an adaptor"):
        no_adaptor.adapt(np.zeros((2, 4 * tiny_tokenizer.whisper_config.d_model), np.float32))


def test_from_bundle_reads_graphs_codebook_and_configs(tiny_snapshot: Path, tiny_graphs: Dict[str, Exported],
                                                       tiny_tokenizer: OnnxAudioTokenizer, speech, tmp_path: Path) -> None:
    """A bundle laid out as export/exporter.py writes it: <name>.fp32.onnx, the codebook as vq_codebook.npy."""
    out = tmp_path / "bundle"
    with BundleWriter(out, model=model_config(tiny_snapshot), source={"snapshot": str(tiny_snapshot)}) as w:
        for name, g in tiny_graphs.items():
            for f in g.result.files:  # the .onnx and its .onnx.data
                shutil.copyfile(f, w.path(f.name))
            w.add(name, g.spec.component, "onnx", "fp32", [f.name for f in g.result.files], profiles=g.spec.profiles(g.module))
        for array_name, array in tiny_graphs["vq_encoder"].spec.sidecar_arrays(tiny_graphs["vq_encoder"].module).items():
            np.save(w.path(f"{array_name}.npy"), array)
            w.add(array_name, "vq_encoder", "npy", str(array.dtype), [f"{array_name}.npy"])
    tok = OnnxAudioTokenizer.from_bundle(out, device="cpu", threads=1, with_adaptor=True)
    assert dataclasses.asdict(tok.vq_config) == dataclasses.asdict(tiny_tokenizer.vq_config)
    clip = speech["qa_example.wav"]
    got, want = tok.encode(clip), tiny_tokenizer.encode(clip)
    np.testing.assert_array_equal(got.semantic_ids, want.semantic_ids)
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(tok.adapt(got.features), tiny_tokenizer.adapt(want.features))


# ---- precision variants of the VQ graph: ids flipped on real speech -----------------------------------------------
def _flips(graphs: Dict[str, Exported], snapshot: Path, speech: Dict[str, np.ndarray], tmp: Path,
           torch_ids: Dict[str, np.ndarray]) -> Dict[str, Dict[str, int]]:
    vq = graphs["vq_encoder"]
    fp32 = _tokenizer(graphs)
    ref = {clip: fp32.semantic_ids(x) for clip, x in speech.items()}
    flips = {"fp32": {clip: int((ref[clip] != torch_ids[clip]).sum()) for clip in speech}}
    calibration = vq.spec.calibration_feeds(vq.module, CalibrationContext(snapshot, [speech[CALIBRATION_CLIP]]))
    for precision in VARIANTS:
        path = make_variant(precision, vq.path, tmp / f"vq_encoder.{precision}.onnx", calibration,
                            vq.spec.int8_dynamic_signed_weights)
        tok = _tokenizer(graphs, vq_path=path)
        flips[precision] = {clip: int((tok.semantic_ids(x) != ref[clip]).sum()) for clip, x in speech.items()}
    return flips


@pytest.mark.parametrize("weights", ["official_fixture", "tiny_snapshot"])
def test_vq_precision_variants_id_flips_on_speech(weights: str, request: pytest.FixtureRequest, speech,
                                                  tmp_path: Path, record_property) -> None:
    """fp32 ONNX + numpy argmin flips no id against the torch reference; fp16 / int8 flips are measured and
    reported (random weights make their number meaningless as a threshold)."""
    snapshot = request.getfixturevalue("fixture_snapshot" if weights == "official_fixture" else "tiny_snapshot")
    graphs = request.getfixturevalue("fixture_graphs" if weights == "official_fixture" else "tiny_graphs")
    torch_ids = {clip: np.asarray(extract_speech_token(graphs["vq_encoder"].module.encoder, [x])[0]) for clip, x in speech.items()}
    flips = _flips(graphs, snapshot, speech, tmp_path, torch_ids)
    totals = {clip: int(ids.shape[0]) for clip, ids in torch_ids.items()}
    for precision, per_clip in flips.items():
        record_property(f"flips_{precision}", per_clip)
        print(f"[{weights}] vq_encoder {precision}: flipped ids " +
              ", ".join(f"{clip} {n}/{totals[clip]}" for clip, n in per_clip.items()))
    assert all(n == 0 for n in flips["fp32"].values()), flips["fp32"]
    assert set(flips) == {"fp32", *VARIANTS}
