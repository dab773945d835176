"""TensorRT engine building (`build_engine`, a standalone script also shipped in deploy bundles)."""
