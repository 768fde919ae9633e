"""KV-cache presses (see `mmreason.kv.base` for the mechanics)."""
