"""Files shipped inside the package: sim.toml is config/sim.toml (a symlink), the embedded default."""
