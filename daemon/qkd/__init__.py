"""QKD key distillation: two-party reconciliation (Cascade) and verification over a message channel."""
