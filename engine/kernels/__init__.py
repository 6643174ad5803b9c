"""tandem's C++ CPU kernels (`csrc/`): paged decode attention and packed linear layers."""
