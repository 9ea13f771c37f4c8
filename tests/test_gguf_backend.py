"""GGUF export + llama.cpp backend vs the PyTorch reference (fp32), on generated random-weight snapshots.

Tolerance: both heads' logits agree to LOGIT_ATOL (absolute, on logits of magnitude ~1-10) at every position; the
F32 GGUF with exact settings (flash attention off, F32 KV cache) measured ~2e-6 on the tiny snapshot."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from kimia_edge.export.gguf_export import (KIMIA_KEYS, export_llm_gguf,
                                           gguf_component_bytes)
from kimia_edge.export.gguf_quantize import quantize_llm
from kimia_edge.export.reference.llm import continuous_feature_scale
from kimia_edge.export.reference.loaders import load_llm
from kimia_edge.export.reference.llm_backend import TorchLLMBackend
from kimia_edge.export.snapshot.llm import write_llm
from kimia_edge.runtime import llm_llamacpp
from kimia_edge.runtime.generation import AUDIO_DELAY_TOKENS, GenerationConfig, generate_steps
from kimia_edge.runtime.llm_backend import LLMBackend
from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend
from kimia_edge.runtime.prompt import AudioEncoding, Message, build_prompt
from kimia_edge.runtime.sampler import SamplerParams
from kimia_edge.runtime.special_tokens import SpecialTokens

LOGIT_ATOL = 5e-5       # F32 GGUF, exact settings vs fp32 torch (measured ~2e-6)
GREEDY_STEPS = 40
SEED = 1234
FP32_SQRT2 = float(continuous_feature_scale(torch.float32))
TOKENS = SpecialTokens()
GREEDY = SamplerParams(0.0, 5, 1.0, 16)


def _export(tmp: Path, size: str, precision: str = "f32"):
    snap = tmp / f"snap_{size}"
    write_llm(snap, size, SEED)
    res = export_llm_gguf(snap, tmp / f"gguf_{size}_{precision}", precision)
    return snap, res


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("gguf_tiny")
    snap, res = _export(tmp, "tiny")
    model = load_llm(snap, dtype=torch.float32)
    return snap, res, model


def _backend(res, **kw) -> LlamaCppBackend:
    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_threads", 1)
    kw.setdefault("exact", True)
    kw.setdefault("feature_scale", FP32_SQRT2)  # the fp32 reference computes sqrt(2) in fp32
    return LlamaCppBackend(res.trunk, res.audio, res.adaptor, **kw)


def _prompt(cfg, rng, length: int = 14, n_cont: int = 6):
    """Random aligned streams with a continuous (feature) span, as the prompt builder lays them out."""
    audio = rng.integers(cfg.kimia_token_offset, cfg.vocab_size, length)
    text = rng.integers(1, cfg.kimia_token_offset, length)
    mask = np.zeros(length, dtype=bool)
    mask[3:3 + n_cont] = True
    feats = rng.standard_normal((n_cont, cfg.kimia_adaptor_input_dim)).astype(np.float32)
    return audio, text, feats, mask


def _close(a: np.ndarray, b: np.ndarray, what: str, atol: float = LOGIT_ATOL) -> float:
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    err = float(np.abs(a - b).max())
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol}"
    return err


def _greedy_parity(ref: TorchLLMBackend, be: LlamaCppBackend, cfg, rng, steps: int, atol: float) -> float:
    audio, text, feats, mask = _prompt(cfg, rng)
    t_ref, a_ref = ref.prefill(audio, text, feats, mask)
    t_gg, a_gg = be.prefill(audio, text, feats, mask)
    worst = max(_close(t_gg, t_ref, "prefill text", atol), _close(a_gg, a_ref, "prefill audio", atol))
    for i in range(steps):
        t_tok, a_tok = int(np.argmax(t_ref)), int(np.argmax(a_ref))
        assert (int(np.argmax(t_gg)), int(np.argmax(a_gg))) == (t_tok, a_tok), f"step {i}: greedy tokens differ"
        if i == steps // 2:
            t_tok = 0  # official quirk: a text id of 0 skips the text embedding
        t_ref, a_ref = ref.step(a_tok, t_tok)
        t_gg, a_gg = be.step(a_tok, t_tok)
        worst = max(worst, _close(t_gg, t_ref, f"step {i} text", atol), _close(a_gg, a_ref, f"step {i} audio", atol))
    return worst


# ------------------------------------------------------------------------------------------------- export
def test_export_files_hold_no_duplicate_and_no_unknown_tensor(tiny):
    _, res, model = tiny
    digests = {}
    for role, path in res.files().items():
        reader = gguf.GGUFReader(str(path))
        names = [t.name for t in reader.tensors]
        assert len(names) == len(set(names)), f"{role}: repeated tensor names"
        for t in reader.tensors:
            d = hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()
            assert d not in digests, f"{role}:{t.name} stores the same bytes as {digests[d]}"
            digests[d] = f"{role}:{t.name}"
    audio_names = {t.name for t in gguf.GGUFReader(str(res.audio)).tensors}
    assert "output.weight" not in audio_names and "token_embd.weight" in audio_names
    # every checkpoint tensor but the ignored inv_freq is stored exactly once
    n_params = len([k for k in model.state_dict()])
    assert len(digests) == n_params
    sizes = gguf_component_bytes(res.files())
    assert set(sizes) == {"trunk", "audio", "adaptor"} and all(v["tensor_bytes"] > 0 for v in sizes.values())


def test_export_metadata(tiny):
    _, res, model = tiny
    cfg = model.config
    reader = gguf.GGUFReader(str(res.trunk))
    f = lambda k: reader.fields[k].contents()  # noqa: E731
    assert f("general.architecture") == "qwen2"
    assert f("qwen2.block_count") == cfg.num_hidden_layers
    assert f("qwen2.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert f(KIMIA_KEYS["fork"]) == cfg.kimia_mimo_transformer_from_layer_index
    # sqrt(2) in the snapshot dtype (bf16), as the official forward computes it
    assert f(KIMIA_KEYS["feature_scale"]) == pytest.approx(1.4140625, abs=0)
    audio = gguf.GGUFReader(str(res.audio))
    assert audio.fields["qwen2.block_count"].contents() == cfg.kimia_mimo_layers
    assert audio.fields[KIMIA_KEYS["role"]].contents() == "audio"


def test_llamacpp_refuses_a_trunk_with_extra_tensors(tmp_path, tiny):
    """Why the adaptor lives in its own file: llama.cpp rejects unknown tensors in a qwen2 file."""
    _, res, _ = tiny
    src = gguf.GGUFReader(str(res.trunk))
    w = gguf.GGUFWriter(tmp_path / "extra.gguf", "qwen2")
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        t = field.types[0]
        add = {gguf.GGUFValueType.STRING: w.add_string, gguf.GGUFValueType.UINT32: w.add_uint32,
               gguf.GGUFValueType.FLOAT32: w.add_float32, gguf.GGUFValueType.BOOL: w.add_bool}[t]
        add(field.name, field.contents())
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor("adaptor.fc1.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(llm_llamacpp.LlamaCppError):
        LlamaCppBackend(tmp_path / "extra.gguf", text_only=True, n_ctx=64, n_threads=1)


# ------------------------------------------------------------------------------------------------- parity
def test_backend_matches_torch_greedy_40_steps(tiny):
    _, res, model = tiny
    with _backend(res) as be:
        assert isinstance(be, LLMBackend)
        worst = _greedy_parity(TorchLLMBackend(model), be, model.config, np.random.default_rng(0), GREEDY_STEPS,
                               LOGIT_ATOL)
    assert worst < LOGIT_ATOL


def test_inputs_embeds_match_reference(tiny):
    """The numpy input rule (adaptor, sqrt(2), text-id-0) equals the reference embed_inputs exactly-ish."""
    _, res, model = tiny
    rng = np.random.default_rng(5)
    audio, text, feats, mask = _prompt(model.config, rng)
    with _backend(res) as be:
        ours = be.embed_inputs(audio, text, feats, mask)
        ref = model.model.embed_inputs(torch.from_numpy(audio)[None], torch.from_numpy(text)[None],
                                       torch.from_numpy(feats), torch.from_numpy(mask)[None])[0].detach().numpy()
        _close(ours, ref, "inputs_embeds", atol=1e-5)
        # text id 0 alone: the text embedding is skipped
        one = be.embed_inputs(audio[:1], np.zeros(1, np.int64), None, None)
        np.testing.assert_array_equal(one, be.embed(audio[:1]))


def test_reset_and_multi_turn_reuse(tiny):
    _, res, model = tiny
    cfg = model.config
    rng = np.random.default_rng(7)
    a1, t1, f1, m1 = _prompt(cfg, rng, 10, 3)
    a2, t2, f2, m2 = _prompt(cfg, rng, 8, 2)
    ref = TorchLLMBackend(model)
    want = ref.prefill(np.concatenate([a1, a2]), np.concatenate([t1, t2]), np.concatenate([f1, f2]),
                       np.concatenate([m1, m2]))
    want_step = ref.step(int(a2[0]), int(t2[0]))
    with _backend(res) as be:
        first = be.prefill(a1, t1, f1, m1)
        be.step(int(a2[0]), int(t2[0]))
        again = be.prefill(a1, t1, f1, m1)  # prefill resets: same result as the first time
        for x, y in zip(first, again):
            np.testing.assert_allclose(x, y, atol=1e-6)
        got = be.append(a2, t2, f2, m2)  # second turn continues the cache
        assert be.position == len(a1) + len(a2)
        for x, y, w in zip(got, want, ("text", "audio")):
            _close(x, y, f"turn 2 {w}")
        for x, y, w in zip(be.step(int(a2[0]), int(t2[0])), want_step, ("text", "audio")):
            _close(x, y, f"turn 2 step {w}")
        be.reset()
        assert be.position == 0
        for x, y in zip(be.prefill(a1, t1, f1, m1), first):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_text_only_and_skipped_heads(tiny):
    _, res, model = tiny
    rng = np.random.default_rng(11)
    audio, text, feats, mask = _prompt(model.config, rng)
    ref = TorchLLMBackend(model)
    t_ref, a_ref = ref.prefill(audio, text, feats, mask)
    with _backend(res, text_only=True) as be:
        assert be.capture is None and be.audio is None  # no audio model, no eval callback
        t, a = be.prefill(audio, text, feats, mask)
        assert a is None
        _close(t, t_ref, "text_only text")
    with _backend(res) as be:
        be.prefill(audio, text, feats, mask)
        t, a = be.step(11, 12, need_text=False)
        t2_ref, a2_ref = ref.step(11, 12)
        assert t is None
        _close(a, a2_ref, "audio with skipped text head")
        for x, y in zip(be.step(13, 14), ref.step(13, 14)):
            _close(x, y, "step after skipped text head")
        # skipped audio heads: the audio model waits, then catches up in one call
        for k in range(3):
            t, a = be.step(15 + k, 16 + k, need_audio=False)
            assert a is None and be.audio_pending == k + 1
            _close(t, ref.step(15 + k, 16 + k)[0], "text with skipped audio head")
        t, a = be.step(20, 21)
        t_r, a_r = ref.step(20, 21)
        assert be.audio_pending == 0
        _close(t, t_r, "text after catch-up")
        _close(a, a_r, "audio after catch-up")


def test_native_hand_off_equals_the_python_callback_bit_for_bit(tiny, monkeypatch):
    """The C++ eval callback (default) hands over the same l_out-<fork> rows as the Python one, bit for bit, so both
    heads' logits are identical too: over a prompt longer than n_batch (several llama_decode calls per capture) and
    over steps, with the audio model deferred (rows waiting in _pending) and caught up."""
    _, res, model = tiny
    rng = np.random.default_rng(21)
    audio, text, feats, mask = _prompt(model.config, rng, length=19)
    runs = {}
    for kind in ("native", "python"):
        with _backend(res, n_batch=8, eval_callback=kind) as be:
            assert be.capture.kind == kind
            out = [be.prefill(audio, text, feats, mask, need_audio=False)]
            pending = [h.copy() for h in be._pending]
            for k in range(6):
                out.append(be.step(int(audio[k]), int(text[k]), need_audio=k % 3 == 2))
                pending += [h.copy() for h in be._pending]
            runs[kind] = (out, np.concatenate(pending))
    (out_n, hid_n), (out_p, hid_p) = runs["native"], runs["python"]
    assert hid_n.shape == hid_p.shape and hid_n.shape[1] == model.config.hidden_size
    np.testing.assert_array_equal(hid_n, hid_p)
    for i, (a, b) in enumerate(zip(out_n, out_p)):
        for x, y in zip(a, b):
            assert (x is None) == (y is None), f"call {i}"
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=f"call {i}")
    # the default is native; KIMIA_EVAL_CALLBACK=python selects the fallback
    with _backend(res) as be:
        assert be.capture.kind == "native"
    monkeypatch.setenv("KIMIA_EVAL_CALLBACK", "python")
    with _backend(res) as be:
        assert be.capture.kind == "python"
    with pytest.raises(ValueError, match="eval_callback"):
        _backend(res, eval_callback="cuda")


def test_native_capture_reports_a_wrong_shape_and_a_full_buffer(tiny):
    _, res, model = tiny
    ggml = llm_llamacpp._init_backend()
    hidden = model.config.hidden_size
    x = np.random.default_rng(0).standard_normal((5, hidden)).astype(np.float32)
    for width, capacity, match in ((hidden + 1, 8, "expected float32"), (hidden, 4, "buffer holds 4")):
        cap = llm_llamacpp.NativeHiddenCapture(ggml, f"l_out-{model.config.kimia_mimo_transformer_from_layer_index}",
                                               width, capacity)
        m = llm_llamacpp.LlamaModel(res.trunk, n_ctx=64, n_batch=8, n_threads=1, n_gpu_layers=0, exact=True,
                                    capture=cap)
        try:
            m.decode(x, 0, want_logits=False)
            with pytest.raises(llm_llamacpp.LlamaCppError, match=match):
                cap.take()
        finally:
            m.close()


def test_errors_are_clear(tiny):
    _, res, model = tiny
    with _backend(res) as be:
        with pytest.raises(ValueError, match="equal length"):
            be.prefill(np.zeros(3, np.int64), np.zeros(2, np.int64), None, np.zeros(3, bool))
        with pytest.raises(ValueError, match="features"):
            be.prefill(np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros((1, 5), np.float32),
                       np.array([0, 1, 0], bool))
        with pytest.raises(ValueError, match="token ids"):
            be.step(model.config.vocab_size, 1)
    with pytest.raises(ValueError, match="trunk"):
        LlamaCppBackend(res.audio, text_only=True)


# ------------------------------------------------------------------------------------------ generation loop
LOOP_STEPS = 48


def _loop_prompt(cfg, output_type: str):
    sem = np.arange(20, 28)
    feats = np.random.default_rng(0).standard_normal((8, cfg.kimia_adaptor_input_dim)).astype(np.float32)
    return build_prompt([Message("user", "text", "hi"), Message("user", "audio", "x")], output_type, TOKENS,
                        cfg.kimia_token_offset, lambda s: [ord(c) for c in s], lambda c: AudioEncoding(sem, feats))


def _run(backend, prompt, tokens, cfg, output_type: str, skip: bool):
    gcfg = GenerationConfig(output_type=output_type, text=GREEDY, audio=GREEDY, step_limit=LOOP_STEPS,
                            skip_unused_heads=skip)
    return [(s.text_id, s.audio_id, s.stop) for s in generate_steps(backend, prompt, tokens, cfg.kimia_token_offset,
                                                                     gcfg)]


@pytest.mark.parametrize("output_type", ["text", "both"])
def test_loop_savings_give_the_golden_tokens(tiny, output_type):
    """The loop with the exact savings on llama.cpp = the loop without them on the torch reference (greedy, both
    streams, 48 steps). In "both" mode the text EOS is set to an id the model emits mid-run, so that the text-ended
    path (trunk head skipped) runs for the rest of the turn."""
    _, res, model = tiny
    cfg = model.config
    prompt = _loop_prompt(cfg, output_type)
    ref = TorchLLMBackend(model)
    tokens = TOKENS
    golden = _run(ref, prompt, tokens, cfg, output_type, skip=False)
    if output_type == "both":
        seen = set()
        for i, (t, _, _) in enumerate(golden):
            if i >= AUDIO_DELAY_TOKENS + 4 and t not in seen:
                tokens = dataclasses.replace(TOKENS, text_eos=t)
                break
            seen.add(t)
        golden = _run(ref, prompt, tokens, cfg, output_type, skip=False)
        ended = [i for i, (t, _, _) in enumerate(golden) if t == tokens.text_eos]
        assert ended and ended[0] < LOOP_STEPS - 20, "the text stream should end early in the run"
    assert len(golden) == LOOP_STEPS, f"golden run stopped early: {golden[-1]}"
    with _backend(res) as be:
        assert _run(be, prompt, tokens, cfg, output_type, skip=True) == golden
        if output_type == "text":  # the audio branch never ran: every position still waits for it
            assert be.audio_pending == be.position
        assert _run(be, prompt, tokens, cfg, output_type, skip=False) == golden
    assert _run(ref, prompt, tokens, cfg, output_type, skip=True) == golden  # torch ignores the flags
    if output_type == "text":
        with _backend(res, text_only=True) as be:
            assert _run(be, prompt, tokens, cfg, output_type, skip=True) == golden
            with pytest.raises(ValueError, match="no audio logits"):
                _run(be, prompt, tokens, cfg, "both", skip=True)


# ------------------------------------------------------------------------------------------ other precisions
def test_f16_export_and_q8_0_quantized_run(tiny, tmp_path):
    snap, res32, model = tiny
    res16 = export_llm_gguf(snap, tmp_path / "f16", "f16")
    q8 = quantize_llm(res32.trunk.parent, tmp_path / "q8", "Q8_0")  # runs llama_model_quantize in a subprocess
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(q8["trunk"])).tensors}
    assert "Q8_0" in types
    rng = np.random.default_rng(3)
    audio, text, feats, mask = _prompt(model.config, rng)
    t_ref, a_ref = TorchLLMBackend(model).prefill(audio, text, feats, mask)
    for name, files, tol in (("f16", res16.files(), 0.05), ("q8_0", q8, 0.2)):
        with LlamaCppBackend(files["trunk"], files["audio"], files["adaptor"], n_ctx=64, n_threads=1,
                             feature_scale=FP32_SQRT2) as be:
            t, a = be.prefill(audio, text, feats, mask)
            for x, y, w in ((t, t_ref, "text"), (a, a_ref, "audio")):
                assert np.isfinite(x).all()
                err = float(np.abs(x - y).max()) / float(np.abs(y).max())
                assert err < tol, f"{name} {w}: relative max error {err:.3g} >= {tol}"
                assert np.corrcoef(x, y)[0, 1] > 0.99, f"{name} {w}: logits decorrelated"


# ------------------------------------------------------------------------------------------------- small
@pytest.mark.slow
def test_small_snapshot_parity(tmp_path):
    torch.set_num_threads(2)
    snap, res = _export(tmp_path, "small")
    model = load_llm(snap, dtype=torch.float32)
    assert model.config.kimia_mimo_transformer_from_layer_index == 21
    with _backend(res, n_threads=2) as be:
        worst = _greedy_parity(TorchLLMBackend(model), be, model.config, np.random.default_rng(1), GREEDY_STEPS,
                               atol=2e-4)
    print(f"small snapshot: worst |logit diff| {worst:.3g}")


def test_the_context_bounds_the_turn_and_a_prompt_it_cannot_hold_is_refused(tiny):
    """A turn stops when the LLM's context is full (stop "context_full"), not with a decode error; a prompt longer than
    the context is refused before any work, with the numbers."""
    from kimia_edge.runtime.generation import ContextFullError

    _, res, model = tiny
    cfg = model.config
    prompt = _loop_prompt(cfg, "text")
    gcfg = GenerationConfig(output_type="text", text=GREEDY, audio=GREEDY, step_limit=200, skip_unused_heads=True)
    room = 40
    with _backend(res, n_ctx=len(prompt) + room) as be:
        steps = list(generate_steps(be, prompt, TOKENS, cfg.kimia_token_offset, gcfg))
        assert len(steps) == room and steps[-1].stop == "context_full"
    with _backend(res, n_ctx=len(prompt) - 1) as be:
        with pytest.raises(ContextFullError, match=rf"needs {len(prompt)} positions but the LLM context holds "
                                                   rf"{len(prompt) - 1}"):
            next(generate_steps(be, prompt, TOKENS, cfg.kimia_token_offset, gcfg))


def test_repack_off_computes_on_the_mapped_file(tiny, tmp_path):
    """``repack=False`` (``--fast-start``) keeps llama.cpp from copying the weights into its CPU layouts (on the
    full-size Q4_K_M trunk about 3 GiB of private memory): no CPU_REPACK buffer, the same logits within rounding."""
    from kimia_edge.export.gguf_quantize import TENSOR_TYPES, quantize_gguf

    _, res, model = tiny
    q4 = quantize_gguf(res.trunk, tmp_path / "trunk.q4_0.gguf", "Q8_0",
                       tensor_types=[(r"blk\..*", TENSOR_TYPES["Q4_0"])])
    x = np.random.default_rng(0).standard_normal((6, model.config.hidden_size)).astype(np.float32)
    logits, buffers = {}, {}
    for repack in (True, False):
        with llm_llamacpp.llama_log_capture() as log:
            m = llm_llamacpp.LlamaModel(q4, n_ctx=64, n_batch=8, n_threads=1, n_gpu_layers=0, exact=True,
                                        repack=repack)
        try:
            logits[repack] = m.decode(x, 0, want_logits=True)
        finally:
            m.close()
        buffers[repack] = [line for line in "".join(log).splitlines() if "model buffer size" in line]
    assert any("REPACK" in b for b in buffers[True]), buffers[True]  # this CPU repacks Q4_0 (else the test says nothing)
    assert not any("REPACK" in b for b in buffers[False]), buffers[False]
    np.testing.assert_allclose(logits[False], logits[True], atol=1e-3, rtol=1e-3)
