"""The contract between build time and run time, defined once and torch-free; both worlds import it.

- ``manifest``:   the bundle's ``manifest.json`` schema, with the typed ``ModelConfig`` section;
- ``graphs``:     artifact names and every ONNX graph's input / output names;
- ``precisions``: the precision registry (ONNX variants: tolerance, TensorRT flags, defaults; GGUF preference);
- ``gguf``:       the LLM GGUF files, their ``kimia.*`` metadata keys and the adaptor's tensor names;
- ``streaming``:  the detokenizer's streaming schedule and the chunk geometry the graphs are profiled for.
"""
