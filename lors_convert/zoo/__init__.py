"""Reference architectures for LORS experiments (plain torch)."""
