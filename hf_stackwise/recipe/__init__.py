"""The YAML recipe: reading, command-line overrides and static validation (``loader``) into typed, frozen sections
(``sections``), and the ``callbacks:`` section (``callbacks``). No weights, no tokenizer, no data.

May import: cache, data, errors, persist, rack, schedule.
"""
