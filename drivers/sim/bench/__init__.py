"""The virtual optical bench: seeded physics of a fiber BBM92 testbed (physics.md), read by the simulated tagger."""
