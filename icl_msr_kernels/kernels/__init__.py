"""Fused kernels per backend: `extension` (the C++/CUDA torch extension, backends "cpp" and
"cuda") and `triton_backend` (backend "triton"). Each exposes `load(...)` returning an object
with the `attention` and `contrastive` pieces described in `icl_msr_kernels.backends`."""

# Integer codes of the modes as the kernels take them: the enums PriorMode and IntMode of
# csrc/tile_math.h. int_mode "none" is plain NT-Xent (no interventional term).
PRIOR_MODE_CODES = {"logit": 0, "mult": 1}
INT_MODE_CODES = {"none": 0, "concat": 1, "add": 2}
