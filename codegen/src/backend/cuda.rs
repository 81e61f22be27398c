//! Stage 4 (GPU): the IR printed as CUDA C. (Filled in below.)
