"""Fused kernels per backend: `extension` (the C++/CUDA torch extension, backends "cpp" and
"cuda") and `triton_backend` (backend "triton"). Each exposes `load(...)` returning an object
with the `attention` and `contrastive` pieces described in `icl_msr_kernels.backends`."""
