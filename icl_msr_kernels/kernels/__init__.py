"""The fused backends' Python side: `interface` (what a backend provides), `ops` (the op surface
they share: schema, fake tensors, autograd, the backend object), `extension` (the C++/CUDA torch
extension, backends "cpp" and "cuda") and `triton_backend` (backend "triton")."""
