"""The YAML recipe: reading, command-line overrides and static validation into typed, frozen sections
(``loader``, ``sections``), and the ``callbacks:`` section (``callbacks``). No weights, no tokenizer, no data.

May import: cache, data, errors, persist, rack, schedule.
"""
