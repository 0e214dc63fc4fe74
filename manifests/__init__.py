"""Data contract: task taxonomy, pair schema, shard/manifest/ledger I/O, commit protocol. No torch, no Ray."""
