"""Engines beyond one process: DDP's reducer re-registered per phase (``ddp``) and FSDP2's transitions, checks and
state dicts (``sharding``).

May import: errors.
"""
