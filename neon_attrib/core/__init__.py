"""Formulas, layers, rules, composites and the estimator base: what every model and explanation stands on."""
