"""The update of the active parameters: the fused calls (:mod:`.update`: bucketing and the sharp
update) and AdamW for the fallback parameters (:mod:`.adamw`); both follow the rules of
:mod:`dropmuon.update_rules`."""
