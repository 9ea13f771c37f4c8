"""Build time: precision variants, accuracy metrics, the quantization study and its report."""
