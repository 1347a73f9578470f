"""The sans-IO core: bytes and ``now`` in, commands out.  Standard library only."""
